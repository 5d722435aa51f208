"""MD with the trained villin CG model: export, LAMMPS force check, NVE drift, NVT runs, and the
free-energy comparison with the CG-mapped all-atom reference.

python -m molgen.main --config=experiments/cg_villin_md.py --workdir=runs/cg_villin_md
python -m molgen.main --config=experiments/cg_villin_md.py:quick --workdir=runs/cg_villin_md_quick

`md.model_workdir` (default runs/cg_villin) must hold a finished run of experiments/cg_villin.py;
if it does not, that experiment (`md.model_experiment`) is trained there first. The default
variant runs the checks of the shipping issue: 10,000 NVE steps, 100,000 NVT steps at 300 K, and
100,000 at 320 K (the lowest temperature of the reference data) for the comparison. `quick` runs
a few thousand steps of each.
"""

import ml_collections

from configs import common


def get_config(variant: str = "full"):
    quick = common.check_variant(variant) == "quick"
    cfg = common.base("cg_md")
    cfg.md = ml_collections.ConfigDict(
        dict(
            model_workdir="runs/cg_villin",
            model_experiment="experiments.cg_villin:quick",  # trained into model_workdir if missing
            seed=0,
            dt=2.0,  # fs
            damp=500.0,  # fs, Langevin damping time (friction 1/damp)
            thermo_every=100,
            chunk=1000,  # steps per LAMMPS `run` between checks of the callback
            force_check=dict(enabled=True, configs=20),
            nve=dict(enabled=True, steps=2000 if quick else 10_000, temperature=300.0),
            nvt=dict(
                temperatures=(300.0, 320.0),
                steps=5000 if quick else 100_000,
                dump_every=50 if quick else 500,
                burn_in=0.1,  # fraction of the frames left out of the comparison
            ),
        )
    )
    return cfg
