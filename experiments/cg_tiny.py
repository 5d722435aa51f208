"""Tiny CG run for tests and smoke checks (a minute on a CPU, simulation included).

python -m molgen.main --config=experiments/cg_tiny.py --workdir=runs/cg_tiny
"""

import os

import experiments.cg_villin as base


def get_config():
    cfg = base.get_config("quick")
    cfg.data.source = os.path.join(base.CACHE, "cg", "villin_tiny")
    cfg.data.simulate.update(
        dict(temperatures=(320,), replicas=2, frames=24, steps_per_frame=5, equilibration_steps=20)
    )
    cfg.data.update(dict(val_fraction=0.2, test_fraction=0.2))
    cfg.model.update(dict(n_layers=2, latent=16, channels=2, embed=4, n_basis=8))
    cfg.priors.bins = 20
    cfg.stages.lbfgs.update(dict(iterations=5, frames=16))
    cfg.stages.stage1.epochs = 2
    cfg.stages.stage2.epochs = 1
    cfg.train.update(dict(batch_size=4, log_every=2))
    cfg.eval.noise_floor.update(dict(configs_per_temperature=1, samples=3, equilibration_steps=10, steps_per_sample=2))
    return cfg
