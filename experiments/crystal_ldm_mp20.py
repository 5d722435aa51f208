"""Crystal latent diffusion (DiT over frozen VAE latents) on the MP-20 subset, conditioned on band gap
(classifier-free guidance; unconditional samples use the null condition).

Needs a finished VAE run:
python -m molgen.main --config=experiments/crystal_vae_mp20.py --workdir=runs/crystal_vae_mp20
then the band-gap predictor that scores the conditional samples:
python -m molgen.main --config=experiments/crystal_predictor_mp20.py --workdir=runs/crystal_predictor_mp20
python -m molgen.main --config=experiments/crystal_ldm_mp20.py --workdir=runs/crystal_ldm_mp20

Variants: quick (default, under 20 min on 2 CPU cores), full (10x the steps), tiny (tests).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.ldm("mp20", variant)
