"""Crystal property predictor (MLP on pooled frozen VAE features) on the MP-20 subset.

Needs a finished VAE run:
python -m molgen.main --config=experiments/crystal_vae_mp20.py --workdir=runs/crystal_vae_mp20
python -m molgen.main --config=experiments/crystal_predictor_mp20.py --workdir=runs/crystal_predictor_mp20

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.predictor("mp20", variant)
