"""Pretraining of the molecular language model: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from molgen.core.distributed import make_mesh
from molgen.core.step import global_batch, make_eval_step
from molgen.lm.model import Qwen3, Qwen3Config, count_params

# the training loop, the dataset (grain, TFDS, RDKit) and the conformer evaluation (RDKit) are
# imported where they are used: `lm_loss` and `init_params` (the benchmarks) need none of them

log = logging.getLogger("molgen")


def lm_loss(model: Qwen3):
    """Next-token cross-entropy summed over targets inside the same packed segment."""

    def loss_fn(params, batch, rng):
        del rng
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits, _ = model.apply({"params": params}, tokens, batch["positions"], seg)
        # position t predicts token t+1: shift the targets, not the logits (slicing [B, T, V]
        # logits costs a padded copy of their gradient); the last column has no target
        targets, next_seg = jnp.roll(tokens, -1, axis=1), jnp.roll(seg, -1, axis=1)
        last = jnp.arange(seg.shape[1]) == seg.shape[1] - 1
        valid = ((next_seg == seg) & (seg > 0) & ~last).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        # the target has the top logit (a tie counts as correct); an argmax over [B, T, V] is a slow
        # index-carrying reduction on CPU (4% of the step)
        target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        correct = (target_logit >= jnp.max(logits, -1)).astype(jnp.float32)
        aux = {"weight": valid.sum(), "loss": (nll * valid).sum(), "accuracy": (correct * valid).sum()}
        return (nll * valid).sum(), aux

    return loss_fn


def build_data(config):
    """Build the TFDS dataset on process 0 (others wait), then open it everywhere."""
    from molgen.lm import data as lm_data

    if jax.process_index() == 0:
        builder = lm_data.build(config.data, config.data.data_dir)
        counts = lm_data.report(builder)["counts"]
        log.info("dataset %s: %s", builder.data_dir, counts)
    multihost_utils.sync_global_devices("molgen_data_built")
    return lm_data.build(config.data, config.data.data_dir)


def init_params(model_cfg: Qwen3Config, seed: int):
    tok = jnp.zeros((1, 8), jnp.int32)
    pos = jnp.arange(8)[None]
    return jax.jit(lambda k: Qwen3(model_cfg).init(k, tok, pos, jnp.ones_like(tok))["params"])(jax.random.key(seed))


def train_and_evaluate(config, workdir: str):
    from molgen.core import loop
    from molgen.lm import data as lm_data
    from molgen.lm import evaluate

    frame, decimals = lm_data.data_knobs(config.data)  # a bad value fails before the dataset is built
    mesh = make_mesh(config.mesh.num_devices)
    model_cfg = Qwen3Config.from_config(config.model)
    model = Qwen3(model_cfg)
    loop.write_json(workdir, "model_config.json", dataclasses.asdict(model_cfg))
    builder = build_data(config)
    source = builder.as_data_source()
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    dc, tc = config.data, config.train
    common = dict(
        global_batch=tc.batch_size,
        seq_len=dc.seq_len,
        streams=streams,
        n_streams=n_streams,
        packing_bins=dc.packing_bins,
        pos_mode=dc.positions,
        frame=frame,
        decimals=decimals,
    )
    if jax.process_index() == 0:  # units longer than a row are skipped, never cut: count and name them
        skipped = {s: lm_data.overlong(source[s], dc.seq_len, frame, decimals) for s in ("train", "validation")}
        report = {"seq_len": dc.seq_len, "frame": frame, "decimals": decimals}
        report["overlong_skipped"] = {s: {"count": len(v), "mol_index": v[:50]} for s, v in skipped.items()}
        loop.write_json(workdir, "data_report.json", report)
        if any(skipped.values()):
            log.warning(
                "skipping units longer than seq_len=%d: %s", dc.seq_len, {s: len(v) for s, v in skipped.items()}
            )
    train = lm_data.pipeline(source["train"], seed=tc.seed, **common)
    params = init_params(model_cfg, tc.seed)
    log.info("model %s: %.2fM parameters", config.model.preset, count_params(params) / 1e6)
    loss_fn = lm_loss(model)
    eval_step = make_eval_step(loss_fn, mesh)

    def eval_fn(params, step):
        val = lm_data.pipeline(source["validation"], seed=0, train=False, **common)
        sums, weight = {}, 0.0
        for _, batch in zip(range(tc.eval_batches), val, strict=False):
            m = jax.device_get(eval_step(params, global_batch(batch, mesh), jax.random.key(0)))
            for k, v in m.items():
                if k != "weight":
                    sums[k] = sums.get(k, 0.0) + float(v) * float(m["weight"])
            weight += float(m["weight"])
        out = {k: v / max(weight, 1.0) for k, v in sums.items()}
        if config.eval.get("during_training", False) and config.eval.num_molecules > 0 and step < tc.steps:
            # the conformer metrics against steps (the final step is evaluated below, with the baseline)
            cfg = config.copy_and_resolve_references()
            cfg.eval.baseline, cfg.eval.relax = False, "none"
            res = evaluate.evaluate(
                cfg, workdir, model_cfg, jax.device_get(params), source["test"], f"eval/step_{step}"
            )
            keys = ("validity", "cov_r", "mat_r", "mat_r_valid", "cov_p", "mat_p")
            out.update({k: res[k] for k in keys if k in res})
        return out

    def tokens_per_step(m):
        return tc.batch_size * dc.seq_len

    state, _ = loop.fit(
        config,
        workdir,
        mesh=mesh,
        params=params,
        loss_fn=loss_fn,
        train_data=train,
        eval_fn=eval_fn,
        items_per_step=tokens_per_step,
        meta={"family": "lm", "stage": "pretrain"},
    )
    if config.eval.num_molecules > 0:
        params = jax.device_get(state.params)
        results = evaluate.evaluate(config, workdir, model_cfg, params, source["test"])
        if jax.process_index() == 0:  # kept per step: a longer run on this workdir overwrites eval/
            step_dir = pathlib.Path(workdir) / "eval" / f"step_{tc.steps}"
            step_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(pathlib.Path(workdir) / "eval" / "conformers.json", step_dir / "conformers.json")
        log.info("conformer evaluation: %s", {k: v for k, v in results.items() if not isinstance(v, (list, dict))})
    if jax.process_index() == 0:
        try:
            evaluate.plot_curves([workdir], f"{workdir}/plots/curves.png")
        except Exception as e:  # a plot must never lose the results already written
            log.warning("plotting failed: %s", e)
    return state
