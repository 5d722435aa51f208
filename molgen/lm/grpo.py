"""GRPO of the molecular LM with conformer rewards (`lm_grpo`).

Trained by the shared loop (`core.loop.fit` with `make_updates`), one GRPO step at a time:
1. the next `grpo.prompts_per_step` training molecules (fit's checkpointed Grain iterator);
2. `grpo.group_size` completions each from the KV-cache sampler, with the current parameters,
   judged by `molgen.lm.rewards` on host worker processes while the device samples the next
   chunk;
3. group-normalised advantages (`grpo.scale_rewards`);
4. old log-probs (when the batch is used more than once) and frozen-reference log-probs (for
   the KL term, or only to log it), one forward pass each;
5. `grpo.mu` passes over the rollouts in `grpo.minibatches` minibatches, each an update by the
   shared data-parallel step with `losses.grpo_loss` (the optimiser schedule spans
   `train.steps x mu x minibatches` updates).
Logged per step: reward and its components, validity and failure reasons, KL, clip fractions,
ratio, completion lengths, and the wall time of sampling, reward waiting and updates.
Held-out evaluation (before training, every `train.eval_every` steps and at the end) samples
the test molecules and reports mean reward, validity and COV/MAT-R/P (`eval_before.json`,
`eval_after.json`, `summary.json`); `rollouts.jsonl` records each step's molecules, rewards
and one sampled text. A killed run resumes from its last checkpoint with the same parameters,
optimiser state, prompt position and sampling keys (keys are folded from the step).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from molgen.core import logging as mlog
from molgen.core import loop
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.step import global_batch, make_row_fn, replicate
from molgen.lm import losses, rewards, rollouts, sequences
from molgen.lm import policy as policy_lib
from molgen.lm.model import Qwen3

log = logging.getLogger("molgen")
ROW_KEYS = ("tokens", "positions", "segment_ids", "target_mask")


def grpo_loss_fn(model: Qwen3, gc, max_len: int):
    def loss_fn(params, batch, rng):
        del rng
        lp, mask = sequences.completion_logps(model, params, batch)
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(lp)
        ref = batch.get("ref_logp")
        loss_sum, weight, st = losses.grpo_loss(
            lp, old, batch["adv"], mask, eps_low=gc.eps_low, eps_high=gc.eps_high, loss_type=gc.loss_type,
            ratio_level=gc.ratio_level, beta=gc.beta, ref_logp_BxT=ref, max_len=max_len,
        )  # fmt: skip
        # stats are per-token means of this device's batch; weighting them by `weight` makes the
        # step's global mean a weight-averaged mean over devices
        aux = {"weight": weight, "loss": loss_sum, **{k: v * weight for k, v in st.items()}}
        return loss_sum, aux

    return loss_fn


def build_rows(groups, ids, adv_PxG, max_len: int, pos_mode: str) -> tuple[dict, int]:
    rows, cut = [], 0
    for p, g in enumerate(groups):
        prompt = rollouts.prompt_ids(g["smiles"])
        for j, comp in enumerate(ids[p]):
            r = sequences.make_row(prompt, comp, max_len, pos_mode)
            cut += int(r.pop("truncated"))
            r["adv"] = np.float32(adv_PxG[p, j])
            rows.append(r)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, cut


def train_and_evaluate(config, workdir: str):
    from molgen.lm.pretrain import build_data

    if config.ckpt.init_from:
        raise ValueError("lm_grpo starts from policy.workdir; ckpt.init_from is not used")
    mesh = make_mesh(config.mesh.num_devices)
    pol, params0 = policy_lib.load_upstream(config, workdir)
    model = Qwen3(pol.model)
    source = build_data(config).as_data_source()
    train_groups = rollouts.molecule_groups(source["train"])
    held = rollouts.molecule_groups(source["test"], config.eval.num_molecules)
    gc, tc, sc = config.grpo, config.train, config.sampling
    reward_cfg = config.rewards.to_dict()
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    if (gc.prompts_per_step // n_streams * gc.group_size) % gc.minibatches:
        raise ValueError("grpo.minibatches must divide each device's rollouts (prompts_per_step/devices x group_size)")
    index = [{"idx": np.int32(i)} for i in range(len(train_groups))]
    prompts = streams_lib.array_pipeline(
        index, ["idx"], global_batch=gc.prompts_per_step, seed=tc.seed, streams=streams, n_streams=n_streams
    )
    need_ref = gc.beta > 0 or gc.log_kl
    need_old = gc.mu > 1 or gc.minibatches > 1
    ref_params = replicate(params0, mesh) if need_ref else None
    logp_fn = make_row_fn(lambda p, b: sequences.completion_logps(model, p, b)[0], mesh)
    pool = rewards.RewardPool(config.rewards_workers)
    main = jax.process_index() == 0
    wd = pathlib.Path(workdir)
    trace, started = wd / "rollouts.jsonl", False

    def make_updates(state, step, item):
        nonlocal started
        if not started:  # this attempt's first step: fit restored step - 1
            started = True
            if step > 1:
                log.info("resumed GRPO at step %d (%d updates)", step - 1, int(jax.device_get(state.step)))
            if main:  # drop the traced steps after the restored checkpoint: they are redone
                mlog.truncate_jsonl(trace, step - 1)
        groups = [train_groups[int(i)] for i in item["idx"]]
        rng = jax.random.fold_in(jax.random.key(tc.seed), step)
        ids, recs, _, times = rollouts.rollout_groups(
            state.params, pol, groups, gc.group_size, rng, sc, reward_cfg, pool, timed=True
        )
        r = np.asarray([[x["reward"] for x in rs] for rs in recs], np.float32)
        adv = np.asarray(losses.group_advantages(r, gc.scale_rewards))
        batch, cut = build_rows(groups, ids, adv, gc.max_len, pol.positions)
        perm = np.random.default_rng([tc.seed, step]).permutation(len(batch["adv"]))
        mbs = []
        for m in range(gc.minibatches):
            gb = global_batch({k: v[perm[m :: gc.minibatches]] for k, v in batch.items()}, mesh)
            if need_old:
                gb["old_logp"] = logp_fn(state.params, gb)
            if need_ref:
                gb["ref_logp"] = logp_fn(ref_params, gb)
            mbs.append(gb)
        lens = np.asarray([len(c) for cs in ids for c in cs])
        extra = rewards.summarize([x for rs in recs for x in rs])
        extra.update(completion_len=float(lens.mean()), completion_len_max=float(lens.max()),
                     truncated=cut / len(lens), reward_std=float(r.std(axis=1).mean()),
                     sample_seconds=times["sample"], reward_wait_seconds=times["reward_wait"])  # fmt: skip
        if main:  # which molecules each step used and what they scored (a resumed run continues this file)
            rec = {"step": step, "mol_index": [g["mol_index"] for g in groups], "reward": r.round(4).tolist(),
                   "example": _example(groups[0], ids[0][0])}  # fmt: skip
            with open(trace, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return mbs * gc.mu, extra

    def evaluate(params, step):
        if not (main and held):
            return {}
        t = time.time()
        res = rollouts.heldout_eval(jax.device_get(params), pol, held, config.eval, reward_cfg, pool)
        res["eval_seconds"] = time.time() - t
        if step == tc.steps:
            loop.write_json(workdir, "eval_after.json", res)
        return res

    try:
        if main and held and not (wd / "eval_before.json").exists():  # a fresh start
            res = evaluate(params0, 0)
            loop.write_json(workdir, "eval_before.json", res)
            writer = mlog.MetricWriter(workdir)
            writer.write(0, res, "eval/")
            writer.close()
            log.info("held-out eval before GRPO: %s", _fmt(res))
        multihost_utils.sync_global_devices("molgen_grpo_start")
        n_updates, loss_fn = gc.mu * gc.minibatches, grpo_loss_fn(model, gc, sc.max_new_tokens)
        state, _ = loop.fit(config, workdir, mesh=mesh, params=params0, loss_fn=loss_fn,
                            train_data=prompts, eval_fn=evaluate, make_updates=make_updates, updates_per_step=n_updates,
                            items_per_step=lambda m: float(gc.prompts_per_step * gc.group_size), item_name="rollouts",
                            meta={"family": "lm_grpo", "updates_per_step": n_updates}, log_keys=SHOW)  # fmt: skip
    finally:
        pool.close()
    if main:
        read = lambda name: json.loads((wd / name).read_text()) if (wd / name).exists() else {}  # noqa: E731
        loop.write_json(workdir, "summary.json", {"before": read("eval_before.json"), "after": read("eval_after.json")})
        try:
            _plot(workdir)
        except Exception as e:  # a plot must never lose the results already written
            log.warning("plotting failed: %s", e)
    multihost_utils.sync_global_devices("molgen_grpo_done")
    return state


def _example(group: dict, completion) -> str:
    from molgen.lm import tokenizer

    return rollouts.enriched.prompt_text(group["smiles"]) + tokenizer.decode(completion)


SHOW = ("reward", "validity", "r_smcov", "r_qual", "kl", "clip_frac", "completion_len", "sample_seconds",
        "reward_wait_seconds", "update_seconds")  # fmt: skip


def _fmt(m: dict, keys=None) -> str:
    keys = keys or [k for k in m if isinstance(m[k], (int, float))]
    return " ".join(f"{k} {m[k]:.4g}" for k in keys if k in m and isinstance(m[k], (int, float)))


def _plot(workdir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = mlog.read_metrics(workdir)
    tr = [r for r in recs if "train/reward" in r]
    if not tr:
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in tr]
    for a, keys in zip(ax, (("train/reward",), ("train/validity",), ("train/kl", "train/clip_frac")), strict=True):
        for k in keys:
            a.plot(steps, [r.get(k, np.nan) for r in tr], label=k.split("/")[1])
        ev = [r for r in recs if "eval/" + keys[0].split("/")[1] in r]
        if ev:
            a.plot([r["step"] for r in ev], [r["eval/" + keys[0].split("/")[1]] for r in ev], "o--", label="held-out")
        a.set(xlabel="GRPO step")
        a.legend()
    fig.tight_layout()
    (pathlib.Path(workdir) / "plots").mkdir(exist_ok=True)
    fig.savefig(pathlib.Path(workdir) / "plots" / "grpo.png", dpi=120)
    plt.close(fig)
