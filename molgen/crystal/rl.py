"""GRPO over the crystal sampler's DDIM chain with Chemeleon2's de-novo reward (`crystal_rl`).

The policy is the whole DiT of a finished LDM run (`config.ldm_workdir`, built first when
missing); the VAE stays frozen. Trained by the shared loop (`core.loop.fit` with
`make_updates`), one RL step at a time:
1. the next `rl.prompts_per_step` training crystals (fit's checkpointed Grain iterator) give the
   atom counts of the groups, `rl.group_size` samples each;
2. DDIM rollouts (`rl.steps` steps, eta `rl.eta`) with the current parameters, keeping every z_t
   and each step's log-probability (`diffusion.sample(trajectory=True)`, reduced by `rl.reduce`,
   the mean over real atoms x latent dims by default); the last step is deterministic (sigma 0)
   and carries no loss;
3. the de-novo reward of the decoded crystals, each part computed over all the step's samples
   (`molgen.crystal.rewards`), and group advantages (r - mean) / (std + 1e-4), 0 for a group
   whose std is below 1e-4 (`lm.losses.group_advantages`);
4. `rl.minibatches` updates over contiguous slices of the samples, each through the shared
   data-parallel step with `lm.losses.grpo_loss` over DDIM steps as tokens: the clipped surrogate
   (clip `rl.clip`), `rl.kl` x k3 KL to the rollout policy, minus `rl.entropy` x the one-sample
   entropy estimate (-log-prob), averaged over the stochastic steps and the samples. Each DiT call
   in the loss is rematerialised, so memory does not grow with the number of steps.
Logged per step: the total reward, each raw reward part's mean, validity, uniqueness, novelty,
the E_hull median, distinct formulas, the hull-supported share, KL, clip fraction and ratio,
and the seconds of sampling, decoding, each reward part and the updates. `rollouts.jsonl`
records every sample's formula and reward parts per step (a resumed run redoes the steps after
its checkpoint and rewrites their lines). Evaluation before and after (`eval_before.json`,
`eval_after.json`, `summary.json`): `eval.n` fresh samples at each eta of `eval.etas`
(`evaluate_policy`). With several processes each one scores its own samples.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from molgen.chem import crystal as xtal
from molgen.chem import match_index
from molgen.core import logging as mlog
from molgen.core import loop
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.step import global_batch
from molgen.core.upstream import ensure_run
from molgen.crystal import diffusion, metrics, rewards, structures
from molgen.crystal.common import crystals_of, load_splits, vae_info
from molgen.crystal.train_ldm import encode_split, load_ldm
from molgen.lm import losses

log = logging.getLogger("molgen")
SHOW = ("reward", "valid", "unique", "novel", "e_hull_median", "kl")


# --- features for the diversity parts --------------------------------------------------------
def feature_fns(sampler):
    """(structure features of latents, composition features of species): the frozen VAE's latent
    and species embedding, each averaged over the real atoms (Chemeleon2's diversity features)."""
    vm, vp = sampler.vmodel, sampler.vparams

    def mean(x, mask):
        m = mask[..., None].astype(jnp.float32)
        return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    structure = jax.jit(mean)
    emb = jax.jit(lambda s, mask: mean(vm.apply({"params": vp}, s, method=lambda mdl, x: mdl.species_embed(x)), mask))
    return structure, emb


class RewardContext:
    """What the reward needs besides the samples: the training set's match index and hull, and
    the training set's diversity features."""

    def __init__(self, config, sampler, splits, hull):
        self.weights = dict(config.reward.weights)
        self.supported_only = bool(config.reward.hull_supported_only)
        self.energy_clip = float(config.reward.get("energy_clip", 1.0))
        self.train = crystals_of(splits["train"])
        self.index = match_index.MatchIndex(self.train)
        self.systems = [frozenset(int(z) for z in c.species) for c in self.train]
        self.hull = hull
        self.structure_fn, self.composition_fn = feature_fns(sampler)
        tr = splits["train"]
        mu = encode_split(sampler.vmodel, sampler.vparams, tr)  # posterior means, unscaled
        n_ref = min(len(mu), int(config.reward.ref_features))
        pick = np.random.default_rng(0).choice(len(mu), n_ref, replace=False) if n_ref < len(mu) else slice(None)
        self.ref_structure = np.asarray(self.structure_fn(mu, tr["mask"]))[pick]
        self.ref_composition = np.asarray(self.composition_fn(tr["species"], tr["mask"]))[pick]
        self.ref_terms = (rewards.mmd_ref_term(self.ref_structure), rewards.mmd_ref_term(self.ref_composition))

    def score(self, crystals, z, species, mask) -> tuple[np.ndarray, dict, dict, dict]:
        """(total reward, raw parts, per-sample facts, seconds per part) of one set of samples;
        `z`: their latents (unscaled, as the VAE decodes them), `species`: decoded atomic numbers."""
        t, secs, w = time.time(), {}, self.weights
        struct, comp = metrics.validity(crystals)
        valid = struct & comp
        unique, novel = metrics.unique_novel(crystals, valid, self.index)
        secs["match"] = time.time() - t
        raw, facts = {}, {"valid": valid, "unique": unique, "novel": novel}
        t = time.time()
        raw["creativity"] = rewards.creativity(crystals, unique, novel, self.index)
        secs["amd"] = time.time() - t
        facts["supported"] = rewards.hull_supported(crystals, self.systems)
        if w.get("energy", 0.0) or self.hull is not None:
            t = time.time()
            e = self.hull.e_above_hull(crystals) if self.hull is not None else np.full(len(crystals), np.nan)
            facts["e_hull"] = e
            raw["energy"] = rewards.energy(e, facts["supported"] if self.supported_only else None, self.energy_clip)
            secs["energy"] = time.time() - t
        t = time.time()
        raw["structure_diversity"] = rewards.mmd_gain(np.asarray(self.structure_fn(z, mask)), self.ref_structure,
                                                      self.ref_terms[0])  # fmt: skip
        raw["composition_diversity"] = rewards.mmd_gain(np.asarray(self.composition_fn(species, mask)),
                                                        self.ref_composition, self.ref_terms[1])  # fmt: skip
        secs["mmd"] = time.time() - t
        total, _ = rewards.combine(raw, w)
        return total, raw, facts, secs


def summarize(total, raw, facts) -> dict:
    """Scalar means of one step's (or one evaluation's) samples."""
    e = facts.get("e_hull")
    out = {"reward": float(np.mean(total)), **{f"r_{k}": float(np.mean(v)) for k, v in raw.items()},
           "valid": float(facts["valid"].mean()),
           "unique": float(facts["unique"].sum() / max(facts["valid"].sum(), 1)),
           "novel": float(facts["novel"].sum() / max(facts["unique"].sum(), 1)),
           "hull_supported": float(facts["supported"].mean())}  # fmt: skip
    if e is not None and np.isfinite(e).any():
        out["e_hull_median"] = float(np.nanmedian(e))
    return out


# --- evaluation ------------------------------------------------------------------------------
def _se(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 0.0) / n)) if n else float("nan")


def evaluate_policy(sampler, ctx: RewardContext, test_c, ec, params) -> dict:
    """`ec.n` fresh samples (atom counts from the training histogram) at each eta of `ec.etas`,
    scored by the sample metrics (validity, uniqueness, novelty, E_hull, S.U.N. and MSUN proxies,
    each rate with its binomial standard error, the E_hull median with a bootstrap one), the
    hull-supported share of the S.U.N. samples, each reward part's mean and the number of
    distinct formulas."""
    sampler.params = params
    out = {}
    for eta in ec.etas:
        sc = types.SimpleNamespace(batch=min(ec.batch, ec.n), steps=ec.steps, eta=float(eta), guidance=1.0)
        t = time.time()
        cs, _, z, species, mask = draw_with_latents(sampler, sc, ec.n, ec.seed)
        rates, per = metrics.evaluate(cs, ctx.train, test_c, ctx.hull)
        total, raw, facts, _ = ctx.score(cs, z, species, mask)
        n, nv, nu = len(cs), int(per["struct_valid"].sum()), int(per["unique"].sum())
        r = dict(rates)
        for k, m in (("struct_valid", n), ("comp_valid", n), ("valid", n), ("stable", n), ("sun", n), ("msun", n)):
            if k in r:
                r[k + "_se"] = _se(r[k], m)
        r["unique_se"] = _se(r["unique"], int((per["struct_valid"] & per["comp_valid"]).sum()))
        r["novel_se"] = _se(r["novel"], nu)
        eh = per.get("e_above_hull")
        if eh is not None and np.isfinite(eh).sum() > 1:
            fin = eh[np.isfinite(eh)]
            boot = np.random.default_rng(0).choice(fin, (200, len(fin))).astype(float)
            r["e_hull_median_se"] = float(np.median(boot, axis=1).std())
            sun = per["unique"] & per["novel"] & (np.nan_to_num(eh, nan=9.0) <= 0.0)
            r["sun_hull_supported"] = float(facts["supported"][sun].mean()) if sun.any() else float("nan")
            r["sun_count"] = int(sun.sum())
        r.update({f"r_{k}": float(np.mean(v)) for k, v in raw.items()})
        r.update({f"r_{k}_se": float(np.std(v, ddof=1) / np.sqrt(len(v))) for k, v in raw.items() if len(v) > 1})
        if "e_hull" in facts:  # the share a demanding reader checks on a weak model: E_hull <= 1 eV/atom
            le1 = float((np.nan_to_num(facts["e_hull"], nan=9.0) <= 1.0).mean())
            r["e_hull_le1"], r["e_hull_le1_se"] = le1, _se(le1, n)
            e1 = rewards.energy(facts["e_hull"])  # Chemeleon2's energy part, whatever reward.energy_clip is
            r["energy_clip1"], r["energy_clip1_se"] = float(e1.mean()), float(e1.std(ddof=1) / np.sqrt(n))
        r["reward"] = float(np.mean(total))
        ok = [c for c, v in zip(cs, per["struct_valid"] & per["comp_valid"], strict=True) if v]
        r["distinct_formulas"] = len({xtal.formula_key(c.species) for c in ok})
        r["hull_supported"] = float(facts["supported"].mean())
        r["n_struct_valid"], r["eval_seconds"] = nv, time.time() - t
        out[f"eta{eta:g}"] = r
        log.info("eval eta %g: %s", eta, " ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float)))
    return out


def draw_with_latents(sampler, sc, n: int, seed: int):
    """`train_ldm.draw` that also returns the unscaled latents, decoded species and masks."""
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    cs, lps, zs, sps, ms = [], [], [], [], []
    for s in range(0, n, sc.batch):
        b = min(sc.batch, n - s)
        mask = sampler.masks(rng, sc.batch)
        z, traj, out = rollout(sampler, jax.random.fold_in(key, s), mask, sc.steps, sc.eta, "mean")
        out = jax.device_get(out)
        cs += structures.to_crystals(out, mask)[:b]
        lps.append(np.asarray(traj["logp"]).sum(0)[:b])
        zs.append(np.asarray(z)[:b])
        sps.append(np.asarray(out["species_logits"]).argmax(-1)[:b] + 1)
        ms.append(mask[:b])
    return cs, np.concatenate(lps), np.concatenate(zs), np.concatenate(sps), np.concatenate(ms)


def rollout(sampler, key, mask, steps: int, eta: float, reduce: str):
    """(z_0 unscaled, trajectory of the scaled latents, decoder outputs) with sampler.params."""
    sig = ("rl", mask.shape, steps, float(eta), reduce)
    if sig not in sampler._fns:

        def run(p, vp, key, mask):
            apply = lambda q, z, t, m, **kw: sampler.dit.apply({"params": q}, z, t, m, **kw)  # noqa: E731
            z, traj = diffusion.sample(apply, p, sampler.sched, key, mask, sampler.dit.latent, steps=steps, eta=eta,
                                       reduce=reduce, trajectory=True)  # fmt: skip
            z = z / sampler.scale
            return z, traj, sampler.vmodel.apply({"params": vp}, z, mask, method=sampler.vmodel.decode)

        sampler._fns[sig] = jax.jit(run)
    return sampler._fns[sig](sampler.params, sampler.vparams, key, jnp.asarray(mask))


# --- the loss ----------------------------------------------------------------------------------
def rl_loss_fn(sampler, rc):
    """loss_fn(params, batch, rng) over stored trajectories: batch z (B, S+1, N, latent), mask,
    old_logp (B, S), adv (B,)."""
    ts, prev = diffusion.ddim_schedule(sampler.sched, rc.steps)
    ts, prev = jnp.asarray(ts), jnp.asarray(prev)

    def apply(q, z, t, m, **kw):
        return sampler.dit.apply({"params": q}, z, t, m, **kw)

    def loss_fn(params, batch, rng):
        del rng
        traj = {"z": jnp.swapaxes(batch["z"], 0, 1), "t": ts, "t_prev": prev}
        lp, std = diffusion.trajectory_logprobs(apply, params, sampler.sched, traj, batch["mask"], rc.eta,
                                                reduce=rc.reduce)  # fmt: skip
        lp = lp.T
        live = jnp.broadcast_to((std > 0)[None], lp.shape)
        loss_sum, weight, st = losses.grpo_loss(lp, batch["old_logp"], batch["adv"], live, eps_low=rc.clip,
                                                eps_high=rc.clip, loss_type="grpo", beta=rc.kl,
                                                ref_logp_BxT=batch["old_logp"])  # fmt: skip
        live_f = live.astype(jnp.float32)
        entropy = (-(lp * live_f).sum(-1) / jnp.maximum(live_f.sum(-1), 1.0)).sum()  # one-sample estimate
        loss_sum = loss_sum - rc.entropy * entropy
        aux = {"weight": weight, "loss": loss_sum, "entropy": entropy, **{k: v * weight for k, v in st.items()}}
        return loss_sum, aux

    return loss_fn


# --- family entry ------------------------------------------------------------------------------
def setup(config):
    """(sampler of the LDM run, its model.json, the VAE's data splits, RewardContext); builds the
    LDM run (and its VAE) first when it has not finished."""
    sampler, info = load_ldm(ensure_run(config.ldm_workdir, config.ldm_config))
    builder, _, splits, _ = load_splits(config, vae_info(info["vae_workdir"]))
    hull = None
    if rc_uses_energy(config) or config.eval.chgnet:
        hull = metrics.Hull(crystals_of(splits["train"]), cache=os.path.join(builder.data_dir, "chgnet_hull.json"))
    return sampler, info, splits, RewardContext(config, sampler, splits, hull)


def train_and_evaluate(config, workdir: str):
    if config.ckpt.init_from:
        raise ValueError("crystal_rl starts from ldm_workdir; ckpt.init_from is not used")
    mesh = make_mesh(config.mesh.num_devices)
    sampler, info, splits, ctx = setup(config)
    rc, tc, ec = config.rl, config.train, config.eval
    main = jax.process_index() == 0
    test_c = crystals_of(splits["test"])
    counts = splits["train"]["mask"].sum(-1)
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    local = rc.prompts_per_step // jax.process_count() * rc.group_size
    if local % (rc.minibatches * jax.local_device_count()):
        raise ValueError(f"rl.minibatches x local devices must divide each process's {local} samples per step")
    prompts = streams_lib.array_pipeline([{"idx": np.int32(i)} for i in range(len(counts))], ["idx"],
                                         global_batch=rc.prompts_per_step, seed=tc.seed, streams=streams,
                                         n_streams=n_streams)  # fmt: skip
    params0 = sampler.params
    wd = pathlib.Path(workdir)
    trace, started = wd / "rollouts.jsonl", False

    def make_updates(state, step, item):
        nonlocal started
        if not started:
            started = True
            if step > 1:
                log.info("resumed crystal RL at step %d", step - 1)
            if main:
                mlog.truncate_jsonl(trace, step - 1)
        sampler.params = state.params
        n_atoms = np.repeat(counts[np.asarray(item["idx"])], rc.group_size)
        mask = np.arange(sampler.vmodel.n_max)[None] < n_atoms[:, None]
        t = time.time()
        z, traj, out = rollout(sampler, jax.random.fold_in(jax.random.key(tc.seed), step), mask, rc.steps, rc.eta,
                               rc.reduce)  # fmt: skip
        z, traj = jax.device_get((z, traj))
        t_sample = time.time() - t
        t = time.time()
        out = jax.device_get(out)
        crystals = structures.to_crystals(out, mask)
        species = np.asarray(out["species_logits"]).argmax(-1) + 1
        t_decode = time.time() - t
        total, raw, facts, secs = ctx.score(crystals, z, species, mask)
        g = len(item["idx"])
        adv = np.asarray(losses.group_advantages(total.reshape(g, rc.group_size), True, 1e-4, rc.zero_std)).ravel()
        rows = {"z": np.swapaxes(np.asarray(traj["z"]), 0, 1), "mask": mask, "old_logp": np.asarray(traj["logp"]).T,
                "adv": adv.astype(np.float32)}  # fmt: skip
        k = len(adv) // rc.minibatches
        mbs = [global_batch({key: v[m * k : (m + 1) * k] for key, v in rows.items()}, mesh)
               for m in range(rc.minibatches)]  # fmt: skip
        extra = summarize(total, raw, facts)
        extra.update(reward_std=float(total.reshape(g, -1).std(axis=1, ddof=1).mean()),
                     distinct_formulas=float(len({xtal.formula_key(c.species) for c in crystals if c is not None})),
                     sample_seconds=t_sample, decode_seconds=t_decode,
                     **{f"reward_{k}_seconds": v for k, v in secs.items()})  # fmt: skip
        if main:
            rec = {"step": step, "formula": [xtal.formula_key(c.species) if c is not None else "" for c in crystals],
                   "reward": np.round(total, 4).tolist(),
                   **{k: np.round(np.asarray(v, float), 4).tolist() for k, v in raw.items()}}  # fmt: skip
            with open(trace, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return mbs, extra

    def evaluate(params, step):
        if not (main and ec.n):
            return {}
        res = evaluate_policy(sampler, ctx, test_c, ec, jax.device_get(params))
        if step == tc.steps:
            loop.write_json(workdir, "eval_after.json", res)
        return _flat(res)

    if main and ec.n and not (wd / "eval_before.json").exists():
        res = evaluate_policy(sampler, ctx, test_c, ec, params0)
        loop.write_json(workdir, "eval_before.json", res)
        writer = mlog.MetricWriter(workdir)
        writer.write(0, _flat(res), "eval/")
        writer.close()
    multihost_utils.sync_global_devices("molgen_crystal_rl_start")
    loop.write_json(workdir, "model.json", {**info, "kind": "crystal_rl", "ldm_workdir": os.path.abspath(
        config.ldm_workdir)})  # fmt: skip
    state, _ = loop.fit(config, workdir, mesh=mesh, params=params0, loss_fn=rl_loss_fn(sampler, rc),
                        train_data=prompts, eval_fn=evaluate, make_updates=make_updates,
                        updates_per_step=rc.minibatches, items_per_step=lambda m: float(rc.prompts_per_step *
                        rc.group_size), item_name="crystals", meta={"family": "crystal_rl"}, log_keys=SHOW)  # fmt: skip
    if main:
        read = lambda name: json.loads((wd / name).read_text()) if (wd / name).exists() else {}  # noqa: E731
        loop.write_json(workdir, "summary.json", {"before": read("eval_before.json"), "after": read("eval_after.json")})
    return state


def rc_uses_energy(config) -> bool:
    return float(config.reward.weights.get("energy", 0.0)) != 0.0


def _flat(res: dict) -> dict:
    return {f"{eta}/{k}": v for eta, r in res.items() for k, v in r.items() if isinstance(v, (int, float))}
