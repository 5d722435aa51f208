"""The training loop every family shares: resume, step, log, evaluate, checkpoint, NaN guard.

Metrics are fetched one step late so the host never waits on the device between steps;
before every checkpoint the current step's metrics are checked, so a checkpoint never
holds a non-finite state. On-policy families (GRPO) give `make_updates`: each step then
builds its own batches from the current parameters and runs several updates.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from molgen.core import checkpoint, optim
from molgen.core import logging as mlog
from molgen.core.step import TrainState, global_batch, make_train_step, replicate

log = logging.getLogger("molgen")


def local_streams(mesh) -> list[int]:
    """Mesh ("data") indices of this process's devices: the data streams it must produce."""
    return [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]


def _state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _fetch(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def fit(
    config,
    workdir: str,
    *,
    mesh,
    params,
    loss_fn: Callable,
    train_data,
    eval_fn: Callable | None = None,
    items_per_step: Callable[[dict], float] | None = None,
    item_name: str = "tokens",
    meta: dict | None = None,
    check: Callable[[int, dict], None] | None = None,
    members: int = 0,
    controller=None,
    make_updates: Callable[[TrainState, int, dict], tuple[list, dict]] | None = None,
    updates_per_step: int = 1,
    log_keys: Sequence[str] = (),
) -> tuple[TrainState, dict]:
    """Train `params` for `config.train.steps` steps; returns (final state, last eval metrics).

    `train_data`: a Grain IterDataset of this process's batch rows (checkpointed with the state).
    `eval_fn(params, step) -> dict`: evaluation metrics ("eval/" is prefixed when logging).
    `check(step, metrics)`: raises to stop the run on a family-specific bad state (after the NaN
    guard; the last good checkpoint is kept).
    `members` > 0: `params` is a stacked ensemble (leading axis of that size) and the optimiser
    runs per member (`optim.per_member`); `loss_fn` sums the members' losses.
    `controller`: host-side state that steers the loss step by step (e.g. DPO's dynamic beta).
    It gives `ctrl()` (the replicated 4th argument of `loss_fn`), `update(step, metrics, rows,
    state) -> extra metrics` (called after every step with the step's per-row outputs; what it
    changes takes effect from the next step), and `state_dict()` / `load(d)`, saved in and
    restored from the checkpoint metadata, so a resumed run continues with the same values.
    `make_updates(state, step, item) -> (batches, extra)`: on-policy steps (GRPO). `item` is
    this process's next element of `train_data` (as it is, not made global); the function
    samples with `state.params` and returns the step's already-global batches in update order
    (repeats included) and host metrics. Each batch is one optimiser update; the step logs the
    mean of the updates' metrics, then `extra`, `update_seconds` and `step_seconds`. The
    optimiser schedule spans `steps x updates_per_step` updates (what `make_updates` returns
    per step); not with `controller`.
    `log_keys`: metrics appended to the progress line.
    """
    tc, steps = config.train, config.train.steps
    if make_updates is not None and controller is not None:
        raise ValueError("fit: make_updates and controller do not combine")
    tx, schedule = optim.make_optimizer(config.optim, steps * updates_per_step)
    if members:
        tx = optim.per_member(tx)
    state = TrainState.create(params, tx)
    mgr = checkpoint.manager(workdir, config.ckpt)
    data_iter = iter(train_data)
    restored = checkpoint.restore_latest(mgr, jax.eval_shape(lambda: _state_dict(state)), data_iter)
    if restored is not None:
        sd, saved_meta, start = restored
        state = state.replace(step=jnp.asarray(sd["step"]), params=sd["params"], opt_state=sd["opt_state"])
        if controller is not None:
            controller.load(saved_meta.get("controller"))
        shown = {k: v for k, v in saved_meta.items() if k != "controller"}
        log.info("resumed from %s at step %d (meta %s)", mgr.directory, start, shown)
    elif mgr.all_steps():  # never silently restart over a run whose checkpoints exist
        raise RuntimeError(
            f"checkpoints {sorted(mgr.all_steps())} in {mgr.directory} exist but none restores "
            "(see the warnings above; a different device count changes the data streams)"
        )
    else:
        start = 0
        if controller is not None:
            controller.load(None)  # a fresh start: nothing of an earlier attempt is kept
        if config.ckpt.init_from:
            state = TrainState.create(checkpoint.restore_params(config.ckpt.init_from, state.params), tx)
    state = replicate(state, mesh)
    step_fn = make_train_step(
        loss_fn,
        mesh,
        extra_metrics=lambda s, g: {"lr": jnp.asarray(schedule(s.step), jnp.float32)},
        with_ctrl=controller is not None,
    )
    writer = mlog.MetricWriter(workdir, resume_step=start)
    progress = mlog.Progress(steps, start, item_name)
    rng = jax.random.key(tc.seed)
    pending, eval_metrics = None, {}
    meta = dict(meta or {})

    def report(step, m):
        mlog.check_finite(step, m)
        if check is not None:
            check(step, m)
        writer.write(step, m, "train/")
        if step % tc.log_every == 0 or step == steps:
            per_step = items_per_step(m) if items_per_step else 0.0
            line = progress.line(step, m, per_step)
            shown = " ".join(f"{k} {m[k]:.4g}" for k in log_keys if k in m)
            log.info(line + (" | " + shown if shown else ""))

    try:
        for step in range(start + 1, steps + 1):
            if make_updates is not None:
                t0 = time.time()
                batches, extra = make_updates(state, step, next(data_iter))
                if len(batches) != updates_per_step:  # the schedule was sized for updates_per_step
                    raise ValueError(f"make_updates gave {len(batches)} batches at step {step}, not {updates_per_step}")
                t1 = time.time()
                state, metrics = _run_updates(step_fn, state, batches, rng)
                metrics.update(extra, update_seconds=time.time() - t1, step_seconds=time.time() - t0)
            elif controller is None:
                state, metrics = step_fn(state, global_batch(next(data_iter), mesh), rng)
            else:  # the controller needs this step's outputs before the next step: no overlap
                batch = global_batch(next(data_iter), mesh)
                state, metrics, rows, cstate = step_fn(state, batch, rng, replicate(controller.ctrl(), mesh))
                metrics = _fetch(metrics)
                rows = multihost_utils.process_allgather(rows, tiled=True)  # every process sees every row
                metrics.update(controller.update(step, metrics, rows, jax.device_get(cstate)))
            if pending is not None:
                report(*pending)
                pending = None
            pending = (step, metrics)
            do_eval = eval_fn is not None and (step % tc.eval_every == 0 or step == steps)
            do_save = step % config.ckpt.every_steps == 0 or step == steps
            if do_eval or do_save or make_updates is not None:  # on-policy metrics are on the host already
                report(step, _fetch(metrics))
                pending = None
            if do_eval:
                eval_metrics = eval_fn(state.params, step)
                writer.write(step, eval_metrics, "eval/")
                log.info("eval step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
            if do_save:
                ck_metrics = {f"eval/{k}": v for k, v in eval_metrics.items()} if do_eval else None
                ck_meta = _meta(meta, step)
                if controller is not None:
                    ck_meta["controller"] = controller.state_dict()
                checkpoint.save(mgr, step, _state_dict(state), data_iter, ck_meta, ck_metrics)
        if pending is not None:
            pending = (pending[0], _fetch(pending[1]))
            report(*pending)
    finally:
        mgr.wait_until_finished()
        writer.flush()
    multihost_utils.sync_global_devices("molgen_fit_done")
    return state, eval_metrics


def _run_updates(step_fn, state: TrainState, batches: list, rng) -> tuple[TrainState, dict]:
    """One update per batch, in order; the mean of their metrics (one host sync in all)."""
    upd = []
    for batch in batches:
        state, m = step_fn(state, batch, rng)
        upd.append(m)
    upd = jax.device_get(upd)
    return state, {k: float(np.mean([np.asarray(u[k]) for u in upd])) for k in upd[0]}


def _meta(meta: dict, step: int) -> dict:
    """Checkpoint metadata: the caller's (e.g. the stage), the step, and the epoch when the
    caller gives `steps_per_epoch`."""
    out = {**meta, "step": step}
    if meta.get("steps_per_epoch"):
        out["epoch"] = step // meta["steps_per_epoch"]
    return out


def write_json(workdir: str, name: str, obj) -> None:
    if jax.process_index() == 0:
        path = pathlib.Path(workdir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=str))
