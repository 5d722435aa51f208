"""Crystal sampling throughput: DDIM-50 (DiT + VAE decoder, one jitted call) at batch 1, 64 and
512, against the full 1000-step ancestral sampler in the same run.

    python benchmarks/crystal_sampling.py [--workdir=runs/crystal_ldm_perov] [--batches=1,64,512] [--json=PATH]
    python benchmarks/crystal_sampling.py --init=random [--dataset=perov] [--variant=quick]

Crystals/s counts the device work (latents and decoder outputs) of one jitted call, timed
after its compilation (median of --reps calls); "+host" adds the conversion to pymatgen-ready
crystals (lattice matrices from parameters). The ancestral sampler is timed at the same
batches with fewer reps. The ratio is DDIM-50 crystals/s over ancestral crystals/s.

--init=random needs no trained workdir: the same sampler (`crystal.train_ldm.Sampler`) over freshly
initialised VAE and DiT parameters of the sizes of configs/crystal.py (--dataset, --variant),
every crystal with n_max atoms (--n_max, default perov 5 / mp20 20) and latent scale 1. The
work per call is the trained model's (same shapes, same number of network evaluations); only
the host conversion sees other (random) lattices. --json writes the figures as one JSON object.

The "+host" column needs pymatgen (pymatgen-core is enough: lattices from parameters); without
it the column reads n/a and the device figures are still measured.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import device_info, median_time, write_json  # noqa: E402
from molgen.crystal import common, diffusion, structures, train_ldm  # noqa: E402


def random_ldm(dataset: str, variant: str, n_max: int):
    """A Sampler over freshly initialised parameters of the configs/crystal.py sizes, and its info."""
    from configs import crystal as crystal_cfg

    vcfg, lcfg = crystal_cfg.vae(dataset, variant), crystal_cfg.ldm(dataset, variant)
    n_max = n_max or {"perov": 5, "mp20": 20}[dataset]
    vmodel = common.make_vae(vcfg.model, n_max)
    vparams = common.init_vae(vmodel, 0, common.example_batch(n_max))
    dit = train_ldm.make_dit(lcfg, vcfg.model.latent, n_max)
    params = train_ldm.init_dit(dit, 0)
    d = lcfg.diffusion
    sched = diffusion.Schedule.linear(d.T, d.beta_start, d.beta_end)
    counts = [0] * n_max + [1]  # every crystal has n_max atoms
    sampler = train_ldm.Sampler(dit, params, sched, vmodel, vparams, 1.0, counts)
    info = {"n_max": n_max, "latent": vcfg.model.latent, "model": lcfg.model.to_dict(), "vae": vcfg.model.to_dict()}
    return sampler, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/crystal_ldm_perov")
    ap.add_argument("--init", default="workdir", choices=["workdir", "random"], help="random: fresh parameters")
    ap.add_argument("--dataset", default="perov", choices=["perov", "mp20"], help="--init=random: model sizes")
    ap.add_argument("--variant", default="quick", choices=["quick", "full", "tiny"], help="--init=random: sizes")
    ap.add_argument("--n_max", type=int, default=0, help="--init=random: atoms per crystal (default per dataset)")
    ap.add_argument("--batches", default="1,64,512")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.init == "random":
        sampler, info = random_ldm(args.dataset, args.variant, args.n_max)
        source = f"random init ({args.dataset} {args.variant} sizes)"
    else:
        if not os.path.exists(os.path.join(args.workdir, "model.json")):
            sys.exit(f"{args.workdir} holds no trained LDM: run an experiments/crystal_ldm_*.py config into it "
                     "first, or pass --init=random")  # fmt: skip
        sampler, info = train_ldm.load_ldm(args.workdir)
        source = args.workdir
    print(f"LDM {source}: n_max {info['n_max']}, latent {info['latent']}, DiT {info['model']}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}")  # fmt: skip
    print(f"{'batch':>6} | {'DDIM-' + str(args.steps) + ' cryst/s':>17} {'+host':>9} | {'ancestral-1000':>15} | "
          f"{'ratio':>6}")  # fmt: skip
    record = {"benchmark": "crystal_sampling", **device_info(), "init": args.init, "source": source,
              "n_max": info["n_max"], "latent": info["latent"], "dit": info["model"], "steps": args.steps,
              "ancestral_steps": int(sampler.sched.T), "reps": args.reps, "batches": []}  # fmt: skip
    try:
        import pymatgen.core  # noqa: F401  (the +host column: lattice matrices from parameters)

        host = True
    except ImportError as e:
        host = False
        record["host_skipped"] = f"pymatgen is not installed ({e})"
        print(f"(+host needs pymatgen, not installed here: {e}; the column reads n/a)")
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(",")):
        mask = sampler.masks(rng, b)
        key = jax.random.key(0)

        def ddim(key=key, mask=mask):
            jax.block_until_ready(sampler.latents(key, mask, steps=args.steps))

        def ddim_host(key=key, mask=mask):
            out, _ = sampler.latents(key, mask, steps=args.steps)
            structures.to_crystals(jax.device_get(out), mask)

        def ancestral(key=key, mask=mask):
            jax.block_until_ready(sampler.latents(key, mask, ancestral=True))

        t_d = median_time(ddim, args.reps)
        t_h = median_time(ddim_host, args.reps) if host else None
        t_a = median_time(ancestral, 1)
        col = f"{b / t_h:>9.1f}" if host else f"{'n/a':>9}"
        print(f"{b:>6} | {b / t_d:>17.1f} {col} | {b / t_a:>15.2f} | {t_a / t_d:>5.1f}x", flush=True)
        record["batches"].append({"batch": b, "ddim_crystals_per_s": b / t_d,
                                  "ddim_host_crystals_per_s": b / t_h if host else None,
                                  "ancestral_crystals_per_s": b / t_a, "ratio": t_a / t_d})  # fmt: skip
        write_json(args.json, record)


if __name__ == "__main__":
    main()
