"""The crystal sampling CLI:

    python -m molgen.crystal.sample --workdir=runs/crystal_ldm_perov --out=runs/samples [--n=500]
        [--steps=50 --eta=0 --guidance=2] [--property=3.0] [--composition=Sr1Ti1O3] [--metrics]

samples crystals from a trained LDM, writes CIFs, and (with --metrics) the metrics JSON against
the LDM's training and test sets.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from molgen.core import cli
from molgen.crystal import common, train_ldm
from molgen.crystal.structures import write_cifs


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: molgen.main defines --workdir too)."""
    flags.DEFINE_string("workdir", None, "a finished experiments/crystal_ldm_*.py run", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "folder for the CIFs and samples.json", required=True, flag_values=fv)
    flags.DEFINE_integer("n", 100, "crystals to sample", flag_values=fv)
    flags.DEFINE_integer("batch", 500, "crystals per sampling batch", flag_values=fv)
    flags.DEFINE_integer("steps", 50, "DDIM steps", flag_values=fv)
    flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic)", flag_values=fv)
    flags.DEFINE_float("guidance", 2.0, "classifier-free guidance scale", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    flags.DEFINE_float("property", None, "target of the model's conditioning property", flag_values=fv)
    flags.DEFINE_string("composition", "", "a formula with explicit counts, e.g. Sr1Ti1O3", flag_values=fv)
    flags.DEFINE_bool("metrics", False, "also score the samples (CHGNet hull if installed)", flag_values=fv)
    return fv


def _cli(args, argv):
    import json
    import types

    import ml_collections
    from pymatgen.core import Composition

    from configs.crystal import DATA_DIR
    from molgen.crystal import diffusion, metrics

    sampler, info = train_ldm.load_ldm(args.workdir)  # not a finished LDM run: cli.run says so in one line
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
    crystals, logp = train_ldm.draw(sampler, sc, args.n, args.seed, cond, atoms)
    paths = write_cifs(crystals, args.out)
    result = {"workdir": args.workdir, "n": args.n, "written": len(paths), "condition": {k: np.asarray(v).tolist()
              for k, v in cond.items()}, "steps": args.steps, "eta": args.eta, "guidance": args.guidance}  # fmt: skip
    if args.metrics:
        vinfo = common.vae_info(info["vae_workdir"])
        _, _, splits, _ = common.load_splits(ml_collections.ConfigDict({"data_dir": DATA_DIR}), vinfo)
        rates, _ = metrics.evaluate(crystals, common.crystals_of(splits["train"]), common.crystals_of(splits["test"]))
        result["metrics"] = rates
    result["mean_step_logprob_sum"] = float(np.mean(logp))
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def main(argv=None):
    """The CLI in this process: main(["--workdir=X", "--out=Y", "--n=3"]); None: from the shell."""
    cli.run("molgen.crystal.sample", _flags, _cli, argv)


if __name__ == "__main__":
    main()
