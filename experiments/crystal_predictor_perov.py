"""Crystal property predictor (MLP on pooled frozen VAE features) on perov_5.

Needs a finished VAE run:
python -m molgen.main --config=experiments/crystal_vae_perov.py --workdir=runs/crystal_vae_perov
python -m molgen.main --config=experiments/crystal_predictor_perov.py --workdir=runs/crystal_predictor_perov

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.predictor("perov", variant)
