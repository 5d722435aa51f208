"""DPO of the SFT policy on pairs from judged rollouts, with a fixed beta or beta-DPO.

Variants (`--config=experiments/lm_dpo.py:VARIANT`):
  quick (default) ~16 min on a 2-core CPU after its inputs (runs/lm_sft and runs/lm_rollouts,
        built first when missing): step-level pairs, sigmoid loss, beta 0.1, RPO term alpha 1,
        lr 3e-5, 150 steps of 8 pairs, reference log-probs precomputed; held-out win rates and
        sample rewards (100 test molecules x 10) before and after.
      python -m molgen.main --config=experiments/lm_dpo.py --workdir=runs/lm_dpo
  beta_dpo        the same with beta-DPO (Wu et al. 2024: rho 0.2 dropped, a 0.6, beta0 0.1).
      python -m molgen.main --config=experiments/lm_dpo.py:beta_dpo --workdir=runs/lm_dpo_betadpo
  long, long_beta_dpo  quick and beta_dpo over 300 steps (~30 min), and the risk/quantile beta
        (experiments/lm_dpo_dynamic_beta.py:long) with a 30-step warm-up instead of 120: at the seed's
        rule (alpha 0.005 per step at most) the quick run's 30 post-warm-up steps moved beta from
        0.100 to 0.1025, so the three modes differed only by noise; 270 steps let beta move up to
        e^(270 x 0.005) = 3.9x. The three long runs are the side-by-side comparison (docs/lm.md).
      python -m molgen.main --config=experiments/lm_dpo.py:long --workdir=runs/lm_dpo_long
  full  from the full SFT and rollouts runs, 3000 steps of 32 pairs.
      python -m molgen.main --config=experiments/lm_dpo.py:full --workdir=runs/lm_dpo_full
  tiny  seconds, from runs/lm_sft_tiny and runs/lm_rollouts_tiny (tests).
The risk/quantile dynamic beta: experiments/lm_dpo_dynamic_beta.py. Any other pair file:
  --config.data.source=files --config.data.train=P.jsonl --config.data.heldout=H.jsonl [--config.data.format=hh]
"""

import ml_collections

from configs import common, lm_post


def get_config(variant: str = "quick"):
    common.check_variant(variant, ("quick", "beta_dpo", "long", "long_beta_dpo", "full", "tiny"))
    full, tiny, long = variant == "full", variant == "tiny", variant.startswith("long")
    suffix = {"full": "_full", "tiny": "_tiny"}.get(variant, "")
    cfg = common.base("lm_dpo")
    cfg.policy = lm_post.policy(f"runs/lm_sft{suffix}", "experiments/lm_sft.py" + (f":{variant}" if suffix else ""))
    cfg.data = ml_collections.ConfigDict(
        dict(
            source="rollouts",
            rollouts=f"runs/lm_rollouts{suffix}",
            rollouts_config="experiments/lm_rollouts.py" + (f":{variant}" if suffix else ""),
            train="",
            heldout="",
            format="pairs",
            max_len=256 if tiny else 448,
        )  # fmt: skip
    )
    cfg.dpo = ml_collections.ConfigDict(
        dict(
            loss="sigmoid",
            ipo_normalize=True,  # loss="ipo": margin of mean token log-probs (TRL's ipo); False: of sums
            label_smoothing=0.0,
            beta=0.1,
            beta_mode="beta_dpo" if variant.endswith("beta_dpo") else "fixed",
            rpo_alpha=1.0,  # RPO's NLL-on-chosen term (losses.rpo_nll): anchors the shared prefixes (README)
            ref_logps="precompute",
            # the seed project's risk/quantile defaults (used when beta_mode="risk")
            risk=dict(delta=0.1, lam=0.1, gamma=2.0, alpha=0.005, beta_min=0.0, beta_max=2.0, warmup_steps=120),
            beta_dpo=dict(drop=0.2, a=0.6, momentum=0.9, min_beta=1e-3),
        )
    )
    cfg.optim = common.optim(lr=3e-5, warmup_steps=10, weight_decay=0.0, schedule="constant")
    cfg.train = common.train(steps=3000 if full else 150, batch_size=32 if full else 8, log_every=10,
                             eval_every=1000 if full else 150, eval_batches=0)  # fmt: skip
    cfg.ckpt = common.ckpt(every_steps=100, keep=2, best_metric="")
    cfg.prompts = lm_post.prompts_data()
    cfg.rewards = lm_post.rewards()
    cfg.rewards_workers = 2
    cfg.eval = lm_post.heldout_eval(heldout_pairs=0)  # 100 test molecules x 10 samples: sample reward SE ~0.015
    if long:
        cfg.train.update(dict(steps=300, eval_every=300))
        cfg.dpo.risk.warmup_steps = 30
    if tiny:
        cfg.train.update(dict(steps=6, batch_size=4, log_every=2, eval_every=6))
        cfg.ckpt.every_steps = 3
        cfg.dpo.risk.warmup_steps = 2
        cfg.prompts = lm_post.prompts_data(**lm_post.TINY_PROMPTS)
        cfg.eval.update(dict(num_molecules=2, samples_per_ref=1, max_new_tokens=48, batch_size=8))
    return cfg
