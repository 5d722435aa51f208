#!/usr/bin/env bash
# GPU readiness suite (issue 22): the LM throughput benchmark (qwen3_0.6b, bf16, with MFU), the CG
# force-field and crystal sampling benchmarks, and the 0.6B pretraining smoke test, each under
# `timeout` and all together within SUITE_BUDGET_S seconds (default 465: 8 minutes with the wheel
# install and start-up), merged into one JSON with each part's wall time, the total, and "failed"
# naming every part that exited non-zero, timed out or wrote no figures (the others are kept).
#
#   benchmarks/gpu_suite.sh [OUT_JSON]     # default $OUT/gpu_suite.json when $OUT is set, else runs/gpu_suite.json
#   SUITE_SIZE=cpu nice -n 19 benchmarks/gpu_suite.sh /tmp/suite.json   # every part shrunk: minutes on a CPU
#
# The parts' output goes to the terminal and to OUT_JSON with .log for .json. Wheels in .whl/
# (benchmarks/gpu_prep.sh) are installed to /tmp/site first and put on PYTHONPATH; .whl/villin.pdb
# (or $VILLIN_PDB) is the CG benchmark's protein, else the one inside pdbfixer.
# Python: $PYTHON, else .venv/bin/python when present, else python3.
# Never part of the tests. How to run it on a lent GPU: benchmarks/GPU.md.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s.%N)
SIZE=${SUITE_SIZE:-gpu}
OUT_JSON=${1:-${OUT:+$OUT/gpu_suite.json}}
OUT_JSON=${OUT_JSON:-runs/gpu_suite.json}
LOG=${OUT_JSON%.json}.log
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT_JSON")"
: >"$LOG"
export PYTHONUNBUFFERED=1

case "$SIZE" in
gpu)
  BUDGET=${SUITE_BUDGET_S:-465}
  LM=(--preset=qwen3_0.6b --dtype=bfloat16 --batch=16 --seq=512 --gen_batch=32 --prompt=48 --new=128 --reps=3)
  CG=(--copies=1,4,16 --reps=5)
  XT=(--init=random --dataset=perov --batches=1,64,512 --reps=3)
  SM=(--preset=qwen3_0.6b --dtype=bfloat16 --remat=1 --batch=8 --seq=4096 --steps=6)
  CAP_LM=170 CAP_CG=70 CAP_XT=60 CAP_SM=465 # the smoke test, last, gets what is left (about 145-160 s if every part hits its cap)
  ;;
cpu)
  BUDGET=${SUITE_BUDGET_S:-900}
  LM=(--preset=cpu_small --dtype=bfloat16 --batch=2 --seq=128 --gen_batch=4 --prompt=8 --new=16 --reps=2 --peak_n=512)
  CG=(--copies=1,4 --reps=2 --layers=1 --latent=16 --batch=4)
  XT=(--init=random --dataset=perov --variant=tiny --batches=1,8 --steps=10 --reps=1)
  SM=(--preset=cpu_small --dtype=bfloat16 --remat=1 --batch=2 --seq=128 --steps=6 --peak_n=512)
  CAP_LM=240 CAP_CG=180 CAP_XT=120 CAP_SM=180
  ;;
*)
  echo "SUITE_SIZE must be gpu or cpu, not $SIZE" >&2
  exit 2
  ;;
esac

elapsed() { awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", b - a }'; }

# --- carried wheels ------------------------------------------------------------------------------
WHEELS_RC=""
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "=== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ to /tmp/site" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1
  WHEELS_RC=$?
  [ "$WHEELS_RC" = 0 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PDB=()
VILLIN_PDB=${VILLIN_PDB:-.whl/villin.pdb}
[ -f "$VILLIN_PDB" ] && PDB=(--pdb="$VILLIN_PDB")

# --- the parts ----------------------------------------------------------------------------------
run_part() { # name cap env-assignment script args...
  local name=$1 cap=$2 envset=$3 left t rc t0 t1
  shift 3
  left=$((BUDGET - $(elapsed) - 5))
  t=$((cap < left ? cap : left))
  if ((t < 15)); then
    echo "=== $name skipped: $left s of the ${BUDGET} s budget left" | tee -a "$LOG"
    echo "$name skipped 0 0 0" >>"$WORK/parts.txt"
    return
  fi
  echo "=== $name (timeout ${t} s): $*" | tee -a "$LOG"
  t0=$(date +%s.%N)
  env $envset timeout -k 5 "$t" "$PY" "$@" --json="$WORK/$name.json" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  echo "=== $name: exit $rc" | tee -a "$LOG"
  echo "$name $rc $t0 $t1 $t" >>"$WORK/parts.txt"
}

: >"$WORK/parts.txt"
# JAX leaves PyTorch (the transformers side of lm_throughput) half of the GPU's memory
run_part lm_throughput "$CAP_LM" XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 benchmarks/lm_throughput.py "${LM[@]}"
run_part cg_throughput "$CAP_CG" "" benchmarks/cg_throughput.py "${CG[@]}" ${PDB[@]+"${PDB[@]}"}
run_part crystal_sampling "$CAP_XT" "" benchmarks/crystal_sampling.py "${XT[@]}"
run_part lm_pretrain_smoke "$CAP_SM" "" benchmarks/lm_pretrain_smoke.py "${SM[@]}"

# --- one JSON -----------------------------------------------------------------------------------
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
"$PY" - "$WORK" "$OUT_JSON" "$SIZE" "$BUDGET" "$START" "$WHEELS_RC" "$GPU_NAME" <<'EOF'
import datetime, glob, json, os, sys, time

work, out, size, budget, start, wheels_rc, gpu = sys.argv[1:8]
parts, failed = {}, []
for line in open(os.path.join(work, "parts.txt")):
    name, rc, t0, t1, limit = line.split()
    entry = {"rc": None if rc == "skipped" else int(rc), "wall_s": round(float(t1) - float(t0), 2),
             "timeout_s": int(limit), "timed_out": rc in ("124", "137"), "skipped": rc == "skipped"}
    path = os.path.join(work, f"{name}.json")
    entry["result"] = json.load(open(path)) if os.path.exists(path) else None
    if entry["skipped"] or entry["rc"] != 0 or entry["result"] is None:
        failed.append(name)
        log = os.path.join(work, f"{name}.log")
        entry["log_tail"] = open(log, errors="replace").read().splitlines()[-25:] if os.path.exists(log) else []
    parts[name] = entry
record = {
    "suite": "benchmarks/gpu_suite.sh",
    "size": size,
    "started": datetime.datetime.fromtimestamp(float(start)).isoformat(timespec="seconds"),
    "total_wall_s": round(time.time() - float(start), 2),
    "budget_s": int(budget),
    "nvidia_smi": gpu or None,
    "wheels": sorted(os.path.basename(p) for p in glob.glob(".whl/*.whl")),
    "wheel_install_rc": int(wheels_rc) if wheels_rc else None,
    "parts": parts,
    "failed": failed,
}
with open(out, "w") as f:
    json.dump(record, f, indent=1)
print(f"=== wrote {out}: total {record['total_wall_s']} s; " + (f"failed {failed}" if failed else "all parts passed"))
sys.exit(1 if failed else 0)
EOF
