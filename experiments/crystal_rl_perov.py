"""GRPO of the crystal LDM's DDIM sampler toward stable, unique, novel crystals on perov_5
(Chemeleon2's de-novo reward; molgen.crystal.rl).

    python -m molgen.main --config=experiments/crystal_rl_perov.py --workdir=runs/crystal_rl_perov

Reads runs/crystal_ldm_perov and builds it (and its VAE) first when missing. Variants: quick
(default), full (1000 steps, the seed's scale), tiny (tests). Writes eval_before.json,
eval_after.json and summary.json (eta 1, the policy RL trains, and eta 0), rollouts.jsonl.
"""

from configs import crystal


def get_config(variant: str = "quick"):
    return crystal.rl("perov", variant)
