"""GRPO of the molecular LM with conformer rewards (`lm_grpo`).

One GRPO step:
1. the next `grpo.prompts_per_step` training molecules (a checkpointed Grain iterator);
2. `grpo.group_size` completions each from the KV-cache sampler, with the current parameters,
   judged by `molgen.lm.rewards` on host worker processes while the device samples the next
   chunk;
3. group-normalised advantages (`grpo.scale_rewards`);
4. old log-probs (when the batch is used more than once) and frozen-reference log-probs (for
   the KL term, or only to log it), one forward pass each;
5. `grpo.mu` passes over the rollouts in `grpo.minibatches` minibatches, each an update by the
   shared data-parallel step with `losses.grpo_loss`.
Logged per step: reward and its components, validity and failure reasons, KL, clip fractions,
ratio, completion lengths, and the wall time of sampling, reward waiting and updates.
Held-out evaluation (before training, every `train.eval_every` steps and at the end) samples
the test molecules and reports mean reward, validity and COV/MAT-R/P (`eval_before.json`,
`summary.json`); `rollouts.jsonl` records each step's molecules, rewards and one sampled
text. A killed run resumes from its last checkpoint with the same parameters,
optimiser state, prompt position and sampling keys (keys are folded from the step).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from molgen.core import checkpoint, loop, optim
from molgen.core import logging as mlog
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.step import TrainState, global_batch, make_row_fn, make_train_step, replicate
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
    prompt_iter = iter(
        streams_lib.array_pipeline(
            index, ["idx"], global_batch=gc.prompts_per_step, seed=tc.seed, streams=streams, n_streams=n_streams
        )
    )
    updates_total = tc.steps * gc.mu * gc.minibatches
    tx, schedule = optim.make_optimizer(config.optim, updates_total)
    state = TrainState.create(params0, tx)
    mgr = checkpoint.manager(workdir, config.ckpt)
    sd = lambda s: {"step": s.step, "params": s.params, "opt_state": s.opt_state}  # noqa: E731
    restored = checkpoint.restore_latest(mgr, jax.eval_shape(lambda: sd(state)), prompt_iter)
    start = 0
    if restored is not None:
        d, meta, start = restored
        state = state.replace(step=jnp.asarray(d["step"]), params=d["params"], opt_state=d["opt_state"])
        log.info("resumed GRPO at step %d (%d updates)", start, int(d["step"]))
    elif mgr.all_steps():
        raise RuntimeError(f"checkpoints {sorted(mgr.all_steps())} in {mgr.directory} exist but none restores")
    state = replicate(state, mesh)
    need_ref = gc.beta > 0 or gc.log_kl
    need_old = gc.mu > 1 or gc.minibatches > 1
    ref_params = replicate(params0, mesh) if need_ref else None
    max_len = gc.max_len
    step_fn = make_train_step(
        grpo_loss_fn(model, gc, sc.max_new_tokens),
        mesh,
        extra_metrics=lambda s, g: {"lr": jnp.asarray(schedule(s.step), jnp.float32)},
    )
    logp_fn = make_row_fn(lambda p, b: sequences.completion_logps(model, p, b)[0], mesh)
    pool = rewards.RewardPool(config.rewards_workers)
    writer = mlog.MetricWriter(workdir, resume_step=start)
    progress = mlog.Progress(tc.steps, start, "rollouts")
    main = jax.process_index() == 0
    trace = pathlib.Path(workdir) / "rollouts.jsonl"
    if main:  # drop steps after the restored checkpoint: they are redone
        mlog.truncate_jsonl(trace, start)

    def evaluate(params, step, name=None):
        if not (main and held):
            return {}
        t = time.time()
        res = rollouts.heldout_eval(jax.device_get(params), pol, held, config.eval, reward_cfg, pool)
        res["eval_seconds"] = time.time() - t
        writer.write(step, res, "eval/")
        log.info("held-out eval at step %d: %s", step, _fmt(res))
        if name:
            loop.write_json(workdir, name, res)
        return res

    try:
        if start == 0 and not (pathlib.Path(workdir) / "eval_before.json").exists():
            evaluate(params0, 0, "eval_before.json")
        multihost_utils.sync_global_devices("molgen_grpo_start")
        after = {}
        for step in range(start + 1, tc.steps + 1):
            t0 = time.time()
            idx = next(prompt_iter)["idx"]
            groups = [train_groups[int(i)] for i in idx]
            rng = jax.random.fold_in(jax.random.key(tc.seed), step)
            ids, recs, _, times = rollouts.rollout_groups(
                state.params, pol, groups, gc.group_size, rng, sc, reward_cfg, pool, timed=True
            )
            r = np.asarray([[x["reward"] for x in rs] for rs in recs], np.float32)
            adv = np.asarray(losses.group_advantages(r, gc.scale_rewards))
            batch, cut = build_rows(groups, ids, adv, max_len, pol.positions)
            perm = np.random.default_rng([tc.seed, step]).permutation(len(batch["adv"]))
            mbs = []
            for m in range(gc.minibatches):
                local = {k: v[perm[m :: gc.minibatches]] for k, v in batch.items()}
                gb = global_batch(local, mesh)
                if need_old:
                    gb["old_logp"] = logp_fn(state.params, gb)
                if need_ref:
                    gb["ref_logp"] = logp_fn(ref_params, gb)
                mbs.append(gb)
            t1 = time.time()
            upd = []
            for _ in range(gc.mu):
                for gb in mbs:
                    state, metrics = step_fn(state, gb, rng)
                    upd.append(metrics)
            upd = jax.device_get(upd)  # one host sync per GRPO step, not one per update
            m = {k: float(np.mean([u[k] for u in upd])) for k in upd[0]}
            flat = [x for rs in recs for x in rs]
            m.update(rewards.summarize(flat))
            lens = np.asarray([len(c) for cs in ids for c in cs])
            m.update(completion_len=float(lens.mean()), completion_len_max=float(lens.max()),
                     truncated=cut / len(lens), reward_std=float(r.std(axis=1).mean()),
                     sample_seconds=times["sample"], reward_wait_seconds=times["reward_wait"],
                     update_seconds=time.time() - t1, step_seconds=time.time() - t0)  # fmt: skip
            mlog.check_finite(step, m)
            writer.write(step, m, "train/")
            if main:  # which molecules each step used and what they scored (a resumed run continues this file)
                rec = {"step": step, "mol_index": [g["mol_index"] for g in groups], "reward": r.round(4).tolist(),
                       "example": _example(groups[0], ids[0][0])}  # fmt: skip
                with open(trace, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if step % tc.log_every == 0 or step == tc.steps:
                log.info(progress.line(step, m, gc.prompts_per_step * gc.group_size) + " | " + _fmt(m, SHOW))
            if step % config.ckpt.every_steps == 0 or step == tc.steps:
                meta = {"family": "lm_grpo", "step": step, "updates": int(jax.device_get(state.step))}
                checkpoint.save(mgr, step, sd(state), prompt_iter, meta)
            if step % tc.eval_every == 0 and step != tc.steps:
                evaluate(state.params, step)
        after = evaluate(state.params, tc.steps, "eval_after.json")
    finally:
        mgr.wait_until_finished()
        writer.flush()
        pool.close()
    if main:
        before = pathlib.Path(workdir) / "eval_before.json"
        summary = {"before": json.loads(before.read_text()) if before.exists() else {}, "after": after}
        loop.write_json(workdir, "summary.json", summary)
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
