"""Rollouts for DPO: k candidates per MOSES prompt from a policy, judged with reward v3, paired.

Variants (`--config=experiments/lm_rollouts.py:VARIANT`):
  quick (default) ~12 min on a 2-core CPU after its policy: the SFT quick run (runs/lm_sft, built
        first, with the quickstart pretraining, when missing); 400 training molecules x 8
        candidates at T=1.0, prefix (step-level) pairs: each candidate that breaks the coordinate
        grammar is repaired from just before the break and the judged repair is chosen over
        the broken prefix; 10% of the prompts held out. Best-against-worst pairs instead:
        --config.pairs.mode=best_worst (what DPO learns from each: README, Post-training).
      python -m molgen.main --config=experiments/lm_rollouts.py --workdir=runs/lm_rollouts
  full  2000 molecules x 16 candidates from runs/lm_sft_full, prefix pairs.
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
            mode="prefix",  # "best_worst" | "all_pairs" (reward gap > margin) | "prefix"
            margin=0.0,
            max_per_prompt=0,
            heldout_frac=0.1,
            seed=0,
        )  # fmt: skip
    )
    if variant == "tiny":
        cfg.data = lm_post.prompts_data(**lm_post.TINY_PROMPTS)
        cfg.rollouts.update(dict(num_prompts=6, k=4, batch_size=8, max_new_tokens=48))
        cfg.pairs.mode = "best_worst"  # tests/test_lm_post_cli.py runs the prefix mode too
        cfg.pairs.margin = -1.0  # the untrained tiny model writes no valid conformer: pair ties to exercise DPO
    return cfg
