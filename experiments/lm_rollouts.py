"""Rollouts for DPO: k candidates per MOSES prompt from a policy, judged with reward v3, paired.

Variants (`--config=experiments/lm_rollouts.py:VARIANT`):
  quick (default) ~6 min on a 2-core CPU after its policy: the SFT quick run (runs/lm_sft, built
        first, with the quickstart pretraining, when missing); 400 training molecules x 8
        candidates at T=1.0, best-against-worst pairs, 10% of the prompts held out.
      python -m molgen.main --config=experiments/lm_rollouts.py --workdir=runs/lm_rollouts
  full  2000 molecules x 16 candidates from runs/lm_sft_full, all ordered pairs with a reward gap > 0.5.
      python -m molgen.main --config=experiments/lm_rollouts.py:full --workdir=runs/lm_rollouts_full
  tiny  seconds, from runs/lm_sft_tiny (tests).
Writes prompts.jsonl, rollouts.jsonl, manifest.json, judged.jsonl, pairs*.jsonl, summary.json.
"""

import ml_collections

from configs import common, lm_post


def get_config(variant: str = "quick"):
    common.check_variant(variant, ("quick", "full", "tiny"))
    quick = variant != "full"
    cfg = common.base("lm_rollouts")
    cfg.policy = {
        "quick": lm_post.policy("runs/lm_sft", "experiments/lm_sft.py"),
        "full": lm_post.policy("runs/lm_sft_full", "experiments/lm_sft.py:full"),
        "tiny": lm_post.policy("runs/lm_sft_tiny", "experiments/lm_sft.py:tiny"),
    }[variant]
    cfg.data = lm_post.prompts_data(**({} if quick else dict(n_train=2000)))
    cfg.rollouts = lm_post.sampling(split="train", num_prompts=400 if quick else 2000, k=8 if quick else 16,
                                    batch_size=64, seed=0)  # fmt: skip
    cfg.rewards = lm_post.rewards()
    cfg.rewards_workers = 2
    cfg.pairs = ml_collections.ConfigDict(
        dict(
            mode="best_worst" if quick else "all_pairs",
            margin=0.0 if quick else 0.5,
            max_per_prompt=0 if quick else 8,
            heldout_frac=0.1,
            seed=0,
        )  # fmt: skip
    )
    if variant == "tiny":
        cfg.data = lm_post.prompts_data(**lm_post.TINY_PROMPTS)
        cfg.rollouts.update(dict(num_prompts=6, k=4, batch_size=8, max_new_tokens=48))
        cfg.pairs.margin = -1.0  # the untrained tiny model writes no valid conformer: pair ties to exercise DPO
    return cfg
