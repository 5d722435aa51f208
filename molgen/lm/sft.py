"""Supervised fine-tuning on prompt/completion data, loss on completion tokens only (`lm_sft`).

Starts from `config.policy.workdir` (a pretraining run; built first from
`config.policy.build_config` when it has not finished). Data (`config.data.source`):
- "moses": the MOSES 3D units of the `data` group (the pretraining builder), split into the
  prompt `[SMILES]s[/SMILES][CONFORMER]` and the completion `enriched[/CONFORMER]`;
- a JSONL path with `{prompt, completion}` lines (bad lines skipped and counted), tokenised
  with `data.codec` ("molecular" or "bytes").
One example per row (`data.max_len`); a completion that does not fit is cut and counted.
The finished run is the reference policy for DPO.
"""

from __future__ import annotations

import logging

import jax

from molgen.chem import enriched
from molgen.core import loop
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.records import as_str
from molgen.core.step import global_batch, make_eval_step
from molgen.lm import evaluate, sequences
from molgen.lm import policy as policy_lib
from molgen.lm.model import Qwen3, Qwen3Config

log = logging.getLogger("molgen")
ROW_KEYS = ("tokens", "positions", "segment_ids", "target_mask")


def sft_loss(model: Qwen3):
    def loss_fn(params, batch, rng):
        del rng
        lp, mask = sequences.completion_logps(model, params, batch)
        aux = {"weight": mask.sum(), "loss": -(lp * mask).sum()}
        return -(lp * mask).sum(), aux

    return loss_fn


def start_policy(config, workdir: str) -> tuple[policy_lib.Policy, dict]:
    """The starting policy (built if needed) and its parameters, recorded in `workdir`; a fresh
    model when `policy.workdir` is empty (e.g. a byte-level model trained from scratch)."""
    from molgen.lm.pretrain import init_params

    if config.policy.workdir:
        return policy_lib.load_upstream(config, workdir)
    model_cfg = Qwen3Config.from_config(config.model)
    pol = policy_lib.Policy("", model_cfg, "sequential", sequences.check_codec(config.data.codec))
    policy_lib.write_policy(workdir, pol.model, pol.positions, pol.codec)
    return pol, init_params(model_cfg, config.train.seed)


def examples(config, pol: policy_lib.Policy, split: str):
    """(prompt ids, completion ids) pairs of a split, and the data source for evaluation."""
    dc = config.data
    if dc.source == "moses":
        from molgen.lm import data as lm_data

        frame, decimals = lm_data.data_knobs(dc)
        source = lm_data.build(dc, dc.data_dir).as_data_source()
        out = []
        for i in range(len(source[split])):
            ex = source[split][i]
            smi, enr = as_str(ex["smiles"]), enriched.reframe(as_str(ex["enriched"]), frame, decimals)
            out.append((sequences.encode_text(enriched.prompt_text(smi), "molecular"),
                        sequences.completion_ids(f"{enr}[/CONFORMER]", "molecular")))  # fmt: skip
        return out, source
    from molgen.lm import rollouts

    counts: dict = {}
    path = dc.source if split == "train" else dc.validation
    out = []
    for n, rec in rollouts.read_jsonl(path, counts, ("prompt", "completion")):
        try:
            prompt = sequences.encode_text(rec["prompt"], pol.codec)
            out.append((prompt, sequences.completion_ids(rec["completion"], pol.codec)))
        except ValueError as e:
            counts["bad_lines"] = counts.get("bad_lines", 0) + 1
            log.warning("%s line %d skipped: %s", path, n, e)
    if counts:
        log.warning("%s: %s", path, counts)
    return out, None


def rows(pairs, max_len: int, pos_mode: str) -> list[dict]:
    out, cut = [], 0
    for p, c in pairs:
        r = sequences.make_row(p, c, max_len, pos_mode)
        cut += int(r.pop("truncated"))
        out.append(r)
    if cut:
        log.warning("%d of %d completions cut at data.max_len=%d", cut, len(out), max_len)
    return out


def train_and_evaluate(config, workdir: str):
    mesh = make_mesh(config.mesh.num_devices)
    pol, params = start_policy(config, workdir)
    model = Qwen3(pol.model)
    dc, tc = config.data, config.train
    train_ex, source = examples(config, pol, "train")
    val_ex, _ = examples(config, pol, "validation")
    train_rows, val_rows = rows(train_ex, dc.max_len, pol.positions), rows(val_ex, dc.max_len, pol.positions)
    log.info("SFT: %d train / %d validation examples from %s", len(train_rows), len(val_rows), dc.source)
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    common = dict(global_batch=tc.batch_size, streams=streams, n_streams=n_streams)
    train = streams_lib.array_pipeline(train_rows, ROW_KEYS, seed=tc.seed, **common)
    loss_fn = sft_loss(model)
    eval_step = make_eval_step(loss_fn, mesh)

    def eval_fn(params, step):
        val = iter(streams_lib.array_pipeline(val_rows, ROW_KEYS, seed=0, train=False, **common))
        tot, w = 0.0, 0.0
        for _ in range(tc.eval_batches):
            m = jax.device_get(eval_step(params, global_batch(next(val), mesh), jax.random.key(0)))
            tot, w = tot + float(m["loss"]) * float(m["weight"]), w + float(m["weight"])
        return {"loss": tot / max(w, 1.0)}

    tokens = lambda m: float(tc.batch_size * dc.max_len)  # noqa: E731
    state, _ = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=loss_fn, train_data=train,
                        eval_fn=eval_fn, items_per_step=tokens, meta={"family": "lm_sft", "stage": "sft"})  # fmt: skip
    if source is not None and config.eval.num_molecules > 0:
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.data.positions = pol.positions
        results = evaluate.evaluate(cfg, workdir, pol.model, jax.device_get(state.params), source["test"])
        log.info("conformer evaluation: %s", {k: v for k, v in results.items() if not isinstance(v, (list, dict))})
    return state
