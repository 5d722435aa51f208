#!/usr/bin/env bash
# Start N molgen processes on this machine, joined by jax.distributed over loopback (gloo).
#
#   launch/local.sh N CONFIG --workdir=runs/x [--config.a.b=v ...]
#
# Environment: PYTHON (default: python), MOLGEN_CPU_DEVICES (fake CPU devices per process,
# default 1), MOLGEN_PORT (coordinator port, default: a free one).
# Exits non-zero if any process fails; the others are then stopped.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [molgen.main flags...]" >&2
  exit 2
fi
N=$1; CONFIG=$2; shift 2
PY=${PYTHON:-python}
PORT=${MOLGEN_PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DEV=${MOLGEN_CPU_DEVICES:-1}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEV"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for ((i = 0; i < N; i++)); do
  $PY -m molgen.main --config="$CONFIG" --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then status=1; cleanup; fi
done
trap - EXIT
exit $status
