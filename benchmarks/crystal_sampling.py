"""Crystal sampling throughput: DDIM-50 (DiT + VAE decoder, one jitted call) at batch 1, 64 and
512, against the full 1000-step ancestral sampler in the same run.

    python benchmarks/crystal_sampling.py [--workdir=runs/crystal_ldm_perov] [--batches=1,64,512]

Crystals/s counts the device work (latents and decoder outputs) of one jitted call, timed
after its compilation (median of --reps calls); "+host" adds the conversion to pymatgen-ready
crystals (lattice matrices from parameters). The ancestral sampler is timed at the same
batches with fewer reps. The ratio is DDIM-50 crystals/s over ancestral crystals/s.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import median_time  # noqa: E402
from molgen.crystal import sample, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/crystal_ldm_perov")
    ap.add_argument("--batches", default="1,64,512")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.workdir, "model.json")):
        sys.exit(f"{args.workdir} holds no trained LDM: run an experiments/crystal_ldm_*.py config into it first")
    sampler, info = train.load_ldm(args.workdir)
    print(f"LDM {args.workdir}: n_max {info['n_max']}, latent {info['latent']}, DiT {info['model']}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}")  # fmt: skip
    print(f"{'batch':>6} | {'DDIM-' + str(args.steps) + ' cryst/s':>17} {'+host':>9} | {'ancestral-1000':>15} | "
          f"{'ratio':>6}")  # fmt: skip
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(",")):
        mask = sampler.masks(rng, b)
        key = jax.random.key(0)

        def ddim(key=key, mask=mask):
            jax.block_until_ready(sampler.latents(key, mask, steps=args.steps))

        def ddim_host(key=key, mask=mask):
            out, _ = sampler.latents(key, mask, steps=args.steps)
            sample.to_crystals(jax.device_get(out), mask)

        def ancestral(key=key, mask=mask):
            jax.block_until_ready(sampler.latents(key, mask, ancestral=True))

        t_d = median_time(ddim, args.reps)
        t_h = median_time(ddim_host, args.reps)
        t_a = median_time(ancestral, 1)
        print(f"{b:>6} | {b / t_d:>17.1f} {b / t_h:>9.1f} | {b / t_a:>15.2f} | {t_a / t_d:>5.1f}x", flush=True)


if __name__ == "__main__":
    main()
