"""Run logging: log.txt, metrics.jsonl, TensorBoard events (process 0 only), progress line, NaN guard."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
import time

import jax
import numpy as np

log = logging.getLogger("molgen")


class NonFiniteError(FloatingPointError):
    """A metric became NaN or Inf; the run stops and keeps its last good checkpoint."""


def setup(workdir: str) -> None:
    """Send the `molgen` logger to stderr and `workdir/log.txt` (process 0 writes the file)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if jax.process_index() == 0:
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(pathlib.Path(workdir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.size == 1 else None


class MetricWriter:
    """Writes scalars to `metrics.jsonl` and TensorBoard; no-op on processes other than 0."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        """`resume_step`: the step the run restarts from; lines of later steps (written by an
        attempt that died after that checkpoint, and about to be redone) are dropped first."""
        self.active = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        if self.active:
            from tensorboardX import SummaryWriter

            if resume_step is not None:
                truncate_jsonl(self.workdir / "metrics.jsonl", resume_step)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.active:
            return
        row = {f"{prefix}{k}": s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        # an undefined metric (e.g. the RMSD of a batch with no valid sample) is left out; a
        # non-finite loss never gets here (check_finite stops the run first)
        row = {k: v for k, v in row.items() if math.isfinite(v)}
        for k, v in row.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **row}) + "\n")
        self._jsonl.flush()

    def flush(self):
        if self.active:
            self._jsonl.flush()
            self._tb.flush()

    def close(self):
        if self.active:
            self._jsonl.close()
            self._tb.close()


def truncate_jsonl(path, step: int) -> None:
    """Keep the lines of a per-step JSONL log (a "step" field each) up to `step`: a resumed run
    redoes the steps after its checkpoint, and each must appear once."""
    path = pathlib.Path(path)
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)  # atomic: a kill here leaves the old or the new file, never half of one


def read_metrics(workdir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl (for plots and summaries)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def check_finite(step: int, metrics: dict, keys=("loss", "grad_norm")) -> None:
    """Raise NonFiniteError naming the step if a metric in `keys` is NaN/Inf, or if the step's
    updated parameters are not finite (`params_finite` == 0, set by core.step)."""
    for k in keys:
        if k in metrics and not math.isfinite(float(metrics[k])):
            raise NonFiniteError(
                f"metric {k!r} is {float(metrics[k])} at step {step}; stopping (the last good checkpoint is kept)"
            )
    if "params_finite" in metrics and float(metrics["params_finite"]) != 1.0:
        raise NonFiniteError(
            f"the parameters after step {step} are not finite; stopping (the last good checkpoint is kept)"
        )


class Progress:
    """One line per report: step, loss, steps/s, items/s (e.g. tokens/s) and ETA."""

    def __init__(self, total_steps: int, start_step: int, item_name: str = "tokens"):
        self.total, self.item = total_steps, item_name
        self.t0, self.s0, self.last_t, self.last_s = time.time(), start_step, time.time(), start_step

    def line(self, step: int, metrics: dict, items_per_step: float) -> str:
        now = time.time()
        sps = (step - self.last_s) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_s = now, step
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        loss = float(metrics.get("loss", float("nan")))
        return (
            f"step {step}/{self.total} loss {loss:.4f} {sps:.2f} steps/s "
            f"{sps * items_per_step:,.0f} {self.item}/s ETA {eta_s}"
        )
