"""Timing helper shared by the benchmarks."""

import time

import numpy as np


def median_time(fn, reps: int) -> float:
    """Median seconds per call over `reps` calls, after one untimed warm-up/compile call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
