"""Crystal VAE on the MP-20 subset (its own train/val/test).

python -m molgen.main --config=experiments/crystal_vae_mp20.py --workdir=runs/crystal_vae_mp20
python -m molgen.main --config=experiments/crystal_vae_mp20.py:full --workdir=runs/crystal_vae_mp20_full

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.vae("mp20", variant)
