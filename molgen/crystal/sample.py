"""From decoder outputs to crystals and CIF files (host side)."""

from __future__ import annotations

import os

import numpy as np

from molgen.chem import crystal as xtal


def to_crystals(out: dict, mask) -> list[xtal.Crystal | None]:
    """Decoder outputs (numpy) -> crystals; None where the decoded lattice admits no cell."""
    mask = np.asarray(mask, bool)
    n = mask.sum(-1)
    species = np.asarray(out["species_logits"]).argmax(-1) + 1
    frac = np.mod(np.asarray(out["frac"], np.float64), 1.0)
    lengths = np.asarray(out["lengths"], np.float64) * np.cbrt(np.maximum(n, 1))[:, None]
    angles = np.rad2deg(np.asarray(out["angles"], np.float64))
    crystals = []
    for i in range(len(n)):
        try:
            lat = xtal.lattice_matrix(np.concatenate([lengths[i], angles[i]]))
        except xtal.CrystalError:
            crystals.append(None)
            continue
        crystals.append(xtal.Crystal(lat, frac[i][mask[i]], species[i][mask[i]]))
    return crystals


def write_cifs(crystals, folder: str, prefix: str = "sample") -> list[str]:
    """One CIF per crystal (a None entry is skipped); returns the paths written."""
    from pymatgen.io.cif import CifWriter

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, c in enumerate(crystals):
        if c is None:
            continue
        p = os.path.join(folder, f"{prefix}_{i:05d}.cif")
        CifWriter(xtal.to_structure(c)).write_file(p)
        paths.append(p)
    return paths


def main(argv=None):
    """python -m molgen.crystal.sample --workdir=runs/crystal_ldm_perov --out=runs/samples [--n=500]
    [--steps=50 --eta=0 --guidance=2] [--band_gap=3.0 | --property=3.0] [--composition=SrTiO3]
    [--metrics]: sample crystals from a trained LDM, write CIFs, and (with --metrics) the
    metrics JSON against the LDM's training and test sets."""
    import argparse
    import json
    import types

    import ml_collections
    from pymatgen.core import Composition

    from configs.crystal import DATA_DIR
    from molgen.crystal import diffusion, metrics, train

    ap = argparse.ArgumentParser(description="sample crystals from a trained crystal LDM")
    ap.add_argument("--workdir", required=True, help="a finished experiments/crystal_ldm_*.py run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--property", type=float, default=None, help="target of the model's conditioning property")
    ap.add_argument("--composition", default="", help="a formula with explicit counts, e.g. Sr1Ti1O3")
    ap.add_argument("--metrics", action="store_true", help="also score the samples (CHGNet hull if installed)")
    args = ap.parse_args(argv)
    sampler, info = train.load_ldm(args.workdir)
    cond, atoms = {}, 0
    if args.property is not None:
        if not info["cond"]["property"]:
            raise SystemExit(f"{args.workdir}: the model is not conditioned on a property")
        cond["prop"] = np.float32(args.property)
    if args.composition:
        if not info["cond"]["composition"]:
            raise SystemExit(f"{args.workdir}: the model is not conditioned on composition")
        comp = Composition(args.composition)
        atoms = int(round(comp.num_atoms))
        if atoms > info["n_max"] or abs(comp.num_atoms - atoms) > 1e-6:
            raise SystemExit(f"--composition={args.composition}: needs a whole number of atoms <= {info['n_max']}")
        species = np.asarray([el.Z for el, k in comp.items() for _ in range(int(k))])
        cond["composition"] = np.asarray(diffusion.composition(species[None], np.ones((1, atoms), bool)))[0]
    sc = types.SimpleNamespace(batch=min(args.batch, args.n), steps=args.steps, eta=args.eta, guidance=args.guidance)
    crystals, logp = train.draw(sampler, sc, args.n, args.seed, cond, atoms)
    paths = write_cifs(crystals, args.out)
    result = {"workdir": args.workdir, "n": args.n, "written": len(paths), "condition": {k: np.asarray(v).tolist()
              for k, v in cond.items()}, "steps": args.steps, "eta": args.eta, "guidance": args.guidance}  # fmt: skip
    if args.metrics:
        with open(os.path.join(info["vae_workdir"], "model.json")) as f:
            vae_info = json.load(f)
        _, _, splits, _ = train.load_splits(ml_collections.ConfigDict({"data_dir": DATA_DIR}), vae_info)
        rates, _ = metrics.evaluate(crystals, train.crystals_of(splits["train"]), train.crystals_of(splits["test"]))
        result["metrics"] = rates
    result["mean_step_logprob_sum"] = float(np.mean(logp))
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
