"""Crystal latent diffusion (DiT over frozen VAE latents) on perov_5.

Needs a finished VAE run:
python -m molgen.main --config=experiments/crystal_vae_perov.py --workdir=runs/crystal_vae_perov
python -m molgen.main --config=experiments/crystal_ldm_perov.py --workdir=runs/crystal_ldm_perov

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.ldm("perov", variant)
