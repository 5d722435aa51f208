"""Orbax checkpoints of train state, Grain iterator state and metadata.

Resume policy: the workdir's own checkpoints first (newest that restores; a newer one that
does not is moved aside to `checkpoints/<step>.corrupt-<time>` and logged), then
`config.ckpt.init_from` (another run's workdir or checkpoint folder: parameters only,
fresh optimiser and data), then from scratch.
Retention: the newest `keep` checkpoints, plus the `keep_best` best by `best_metric`.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("molgen")


def manager(workdir: str, cfg) -> ocp.CheckpointManager:
    policies = [ocp.checkpoint_managers.LatestN(n=max(1, cfg.keep))]
    if cfg.best_metric:
        sign = -1.0 if cfg.best_mode == "min" else 1.0
        policies.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: sign * float(m[cfg.best_metric]),
                n=cfg.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints", item_names=("state", "data", "meta"), options=options
    )


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict, metrics: dict | None = None):
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        import grain  # only with a data iterator: loading parameters (benchmarks, export) needs no Grain

        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    mgr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)


def _restore_step(mgr, step, abstract_state, data_iter):
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        import grain

        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mgr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, data_iter):
    """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

    A checkpoint that fails while an older one restores is corrupt (a killed save, a damaged
    disk): it is moved aside to `<step>.corrupt-<time>` and logged, so the resumed run can save
    that step again. When none restores (e.g. another device count), nothing is moved.
    """
    failed = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            state, meta = _restore_step(mgr, step, abstract_state, data_iter)
        except Exception as e:  # a corrupt or partial checkpoint: fall back to the previous one
            log.warning(
                "checkpoint %s/%d does not restore (%s: %s); falling back to the previous one",
                mgr.directory,
                step,
                type(e).__name__,
                str(e).splitlines()[0][:300] if str(e) else "",
            )
            failed.append(step)
            continue
        if failed:
            _move_aside(mgr, failed)
        return state, meta, step
    return None


def _move_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if jax.process_index() == 0:
        for step in steps:
            src = pathlib.Path(mgr.directory) / str(step)
            dst = src.with_name(f"{step}.corrupt-{stamp}")
            src.rename(dst)
            log.warning("moved the corrupt checkpoint %s aside to %s", src, dst.name)
    multihost_utils.sync_global_devices("molgen_ckpt_move_aside")
    mgr.reload()


def restore_params(path: str, abstract_params):
    """Parameters from another run (`init_from`): a workdir, its checkpoints/ folder or a step folder."""
    p = pathlib.Path(path).expanduser().absolute()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not (p / "state").is_dir():
        steps = sorted((int(c.name) for c in p.iterdir() if c.name.isdigit()), reverse=True) if p.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"init_from={path!r}: no checkpoint found under {p}")
        p = p / str(steps[0])
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)}
    # as host numpy arrays: the run that saved them may have used another device layout
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        out = ocp.PyTreeCheckpointer().restore(
            p / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    except Exception as e:
        raise ValueError(f"init_from={path!r}: cannot restore params from {p / 'state'}: {e}") from e
    log.info("initialised parameters from %s", p)
    return out["params"]
