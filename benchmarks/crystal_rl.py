"""Seconds per crystal RL step (molgen.crystal.rl), split into DDIM rollout (sampling), decoding,
each reward part (StructureMatcher uniqueness/novelty, AMD creativity, CHGNet E_hull, MMD
diversity) and the updates, at group sizes 16, 32 and 64 (5 prompts each, Chemeleon2's shape).

    python benchmarks/crystal_rl.py [--dataset=perov] [--ldm=runs/crystal_ldm_perov] [--groups=16,32,64] [--json=PATH]

Reads a finished LDM run (experiments/crystal_ldm_{perov,mp20}.py; built when missing, as the RL
experiment does). Each phase is timed once after a warm-up step at the same shapes (so
compilation and process-pool start-up are excluded); the updates are `rl.minibatches` jitted
gradient steps of the RL loss over the stored trajectories (value and gradient, on one device).
The ratio column is seconds per sample against the smallest group size in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import device_info, write_json  # noqa: E402
from molgen.crystal import rl, structures  # noqa: E402


def one_step(sampler, ctx, rc, counts, grad_fn, g: int, prompts: int, seed: int) -> dict:
    n_atoms = np.repeat(np.random.default_rng(seed).choice(counts, prompts), g)
    mask = np.arange(sampler.vmodel.n_max)[None] < n_atoms[:, None]
    t = time.time()
    z, traj, out = jax.block_until_ready(rl.rollout(sampler, jax.random.key(seed), mask, rc.steps, rc.eta, rc.reduce))
    times = {"sampling": time.time() - t}
    t = time.time()
    out = jax.device_get(out)
    crystals = structures.to_crystals(out, mask)
    species = np.asarray(out["species_logits"]).argmax(-1) + 1
    times["decoding"] = time.time() - t
    total, _, _, secs = ctx.score(crystals, np.asarray(z), species, mask)
    times.update({f"reward_{k}": v for k, v in secs.items()})
    rows = {"z": np.swapaxes(np.asarray(traj["z"]), 0, 1), "mask": mask, "old_logp": np.asarray(traj["logp"]).T,
            "adv": np.asarray(total - total.mean(), np.float32)}  # fmt: skip
    k = len(total) // rc.minibatches
    t = time.time()
    for m in range(rc.minibatches):
        jax.block_until_ready(grad_fn(sampler.params, {key: v[m * k : (m + 1) * k] for key, v in rows.items()}))
    times["updates"] = time.time() - t
    times["step"] = sum(times.values())
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="perov", choices=["perov", "mp20"])
    ap.add_argument("--ldm", default="", help="LDM workdir (default: the quick run of --dataset)")
    ap.add_argument("--groups", default="16,32,64")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from configs import crystal as crystal_cfg

    config = crystal_cfg.rl(args.dataset, "quick")
    if args.ldm:
        config.ldm_workdir = args.ldm
    sampler, _, splits, ctx = rl.setup(config)
    rc = config.rl
    counts = splits["train"]["mask"].sum(-1)
    loss_fn = rl.rl_loss_fn(sampler, rc)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
    res = {"device": device_info(), "dataset": args.dataset, "prompts": args.prompts, "ddim_steps": rc.steps,
           "minibatches": rc.minibatches, "groups": {}}  # fmt: skip
    for g in [int(x) for x in args.groups.split(",")]:
        one_step(sampler, ctx, rc, counts, grad_fn, g, args.prompts, seed=0)  # compile and warm the pools
        res["groups"][g] = one_step(sampler, ctx, rc, counts, grad_fn, g, args.prompts, seed=1)
    base_g = min(res["groups"])
    base = res["groups"][base_g]["step"] / (base_g * args.prompts)
    keys = list(res["groups"][base_g])
    print("group " + " ".join(f"{k:>18s}" for k in keys) + "   s/sample  ratio")
    for g, t in res["groups"].items():
        per = t["step"] / (g * args.prompts)
        t["seconds_per_sample"], t["ratio_per_sample_vs_smallest"] = per, per / base
        print(f"{g:5d} " + " ".join(f"{t[k]:18.3f}" for k in keys) + f"   {per:8.4f}  {per / base:5.2f}")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
