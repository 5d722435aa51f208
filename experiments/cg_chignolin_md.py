"""The chignolin CG model's free-energy landscape against the all-atom reference at 340 K.

python -m molgen.main --config=experiments/cg_chignolin_md.py --workdir=runs/cg_chignolin_md
python -m molgen.main --config=experiments/cg_chignolin_md.py:quick --workdir=runs/cg_chignolin_md_quick

`md.model_workdir` (default runs/cg_chignolin) must hold a finished run of experiments/cg_chignolin.py;
if it does not, that experiment (`md.model_experiment`) is trained there first. The CG model and
its priors alone each run `copies` independent copies in jax-md (half from the folded structure,
half from unfolded reference frames), and the exported model runs in LAMMPS; molgen.cg.landscape
compares the 1D and 2D free energies, the folded fraction and the transitions with the
reference (all its frames at `temperature`). full: 1 ns per copy (32 ns in all); quick: 0.2 ns per copy.

Folded: CA RMSD to the folded structure (the minimised crystal structure 5AWL) below 1.0 Å;
unfolded core (for counting transitions): above 3.0 Å.
"""

import ml_collections

from configs import common


def get_config(variant: str = "full"):
    quick = common.check_variant(variant, ("quick", "full", "tiny")) != "full"
    tiny = variant == "tiny"
    cfg = common.base("cg_landscape")
    cfg.md = ml_collections.ConfigDict(
        dict(
            model_workdir="runs/cg_chignolin",
            model_experiment="experiments.cg_chignolin:quick",  # trained into model_workdir if missing
            members="best",  # an ensemble's best member, or "mean": the mean of its members' network energies
            temperature=340,
            reference_frame_ps=0.0,  # ps between reference frames; 0: the data's provenance (frame_ps)
            seed=0,
            dt=5.0,  # fs; the priors' ensemble at 5 fs matches 2 fs (docs/cg.md)
            damp=500.0,  # fs, Langevin damping time
            copies=4 if tiny else 32,
            steps=1000 if tiny else 40_000 if quick else 200_000,  # 0.2 / 1 ns per copy
            record_every=40 if tiny else 200,  # steps between frames (1 ps)
            burn_in=0.1,  # fraction of each CG trajectory left out
            priors_only=True,
            lammps=dict(
                enabled=True,
                copies=4 if tiny else 8,
                steps=1000 if tiny else 20_000 if quick else 200_000,
                chunk=500 if tiny else 10_000,
            ),  # fmt: skip
            folded_below=1.0,  # Å CA RMSD
            unfolded_above=3.0,
            blocks=10,
            tica_lag=20,  # reference frames
            bins=30,
        )
    )
    return cfg
