"""DPO with the seed project's risk/quantile dynamic beta and its defaults.

delta 0.1, lambda 0.1, beta0 0.1, gamma 2, alpha 0.005, beta in [0, 2], 120 warmup steps
(REFERENCE.md section 1); everything else as experiments/lm_dpo.py (same pairs, policy, steps).
  quick (default):
      python -m molgen.main --config=experiments/lm_dpo_dynamic_beta.py --workdir=runs/lm_dpo_risk
  long: 300 steps with a 30-step warm-up, so that beta moves (beside lm_dpo.py:long and :long_beta_dpo):
      python -m molgen.main --config=experiments/lm_dpo_dynamic_beta.py:long --workdir=runs/lm_dpo_risk_long
  full:
      python -m molgen.main --config=experiments/lm_dpo_dynamic_beta.py:full --workdir=runs/lm_dpo_risk_full
Per-step beta, tau, p_hat and u are in metrics.jsonl; per-pair margins in margins/margins.jsonl;
plots/dpo_beta.png shows beta and the threshold over steps.
"""

import experiments.lm_dpo as base


def get_config(variant: str = "quick"):
    cfg = base.get_config(variant)
    cfg.dpo.beta_mode = "risk"
    return cfg
