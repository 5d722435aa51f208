"""Timing and reporting helpers shared by the benchmarks."""

import json
import os
import time

import numpy as np

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) of the accelerators the GPU suite runs on,
# by a substring of jax's device_kind: the nominal figure MFU is also quoted against.
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def median_time(fn, reps: int) -> float:
    """Median seconds per call over `reps` calls, after one untimed warm-up/compile call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(n=2048, reps=10, dtype="float32") -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (random operands: all-zero ones run faster on GPUs)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    dt = median_time(lambda: f(a).block_until_ready(), reps)
    return 2 * n**3 / dt


def default_peak_n() -> int:
    """Matmul size of the measured peak: 2048 on a CPU, 8192 on an accelerator (large enough to
    reach a GPU's tensor-core peak)."""
    import jax

    return 2048 if jax.devices()[0].platform == "cpu" else 8192


def nominal_bf16_peak(device_kind: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in device_kind), None)


def device_info() -> dict:
    """The device a benchmark ran on, for its JSON record."""
    import jax

    d = jax.devices()[0]
    return {"device_kind": d.device_kind, "platform": d.platform, "device_count": jax.device_count(),
            "jax": jax.__version__}  # fmt: skip


def write_json(path: str | None, record: dict) -> None:
    """Write `record` as one JSON object to `path` (nothing when path is empty). Benchmarks call
    this after each measured section, so a run stopped by a timeout keeps what it measured."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=float)
    os.replace(tmp, path)
