"""Crystal VAE on perov_5 (val+test pooled, split 80/10/10 with seed 0).

python -m molgen.main --config=experiments/crystal_vae_perov.py --workdir=runs/crystal_vae_perov
python -m molgen.main --config=experiments/crystal_vae_perov.py:full --workdir=runs/crystal_vae_perov_full

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.vae("perov", variant)
