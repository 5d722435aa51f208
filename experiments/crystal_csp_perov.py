"""Crystal structure prediction on perov_5: a composition-conditioned LDM over the frozen VAE,
then 20 structures per test composition, matched to the test crystal (match rate and RMSE at
k = 1 and k = 20, DiffCSP's protocol; molgen.crystal.csp).

    python -m molgen.main --config=experiments/crystal_csp_perov.py --workdir=runs/crystal_csp_perov

Reads runs/crystal_vae_perov and builds it first when missing. Variants: quick (default), full,
tiny (tests). Writes csp.json and the k = 1 structures as CIFs (samples/csp_k1).
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.csp("perov", variant)
