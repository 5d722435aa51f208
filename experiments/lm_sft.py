"""SFT of a pretrained molecular LM on prompt/completion units (loss on the conformer only).

Variants (`--config=experiments/lm_sft.py:VARIANT`):
  quick (default) ~6 min on a 2-core CPU after the quickstart pretraining (built first if
        runs/lm_quickstart has not finished): 200 steps on its MOSES units, then conformer
        evaluation on the 100 held-out test molecules.
      python -m molgen.main --config=experiments/lm_sft.py --workdir=runs/lm_sft
  full  from the longer pretraining run (experiments/lm_pretrain_moses.py), 2000 steps.
      python -m molgen.main --config=experiments/lm_sft.py:full --workdir=runs/lm_sft_full
  tiny  seconds, from runs/lm_tiny (tests).
The finished run is the reference policy of experiments/lm_rollouts.py and lm_dpo.py.
"""

import experiments.lm_quickstart as quickstart
import experiments.lm_tiny as lm_tiny
from configs import common, lm_post


def get_config(variant: str = "quick"):
    common.check_variant(variant, ("quick", "full", "tiny"))
    tiny = variant == "tiny"
    cfg = common.base("lm_sft")
    cfg.policy = {
        "quick": lm_post.policy(),
        "full": lm_post.policy("runs/lm_pretrain", "experiments/lm_pretrain_moses.py"),
        "tiny": lm_post.policy("runs/lm_tiny", "experiments/lm_tiny.py"),
    }[variant]
    base = (lm_tiny if tiny else quickstart).get_config()
    data = base.data
    data.update(dict(source="moses", validation="", codec="molecular", max_len=256 if tiny else 448))
    if variant == "full":
        data.update(dict(n_train=8000, n_val=200))
    cfg.data = data
    cfg.model = base.model  # used only when policy.workdir is empty (a fresh model)
    cfg.optim = common.optim(lr=5e-4, warmup_steps=20, weight_decay=0.05, schedule="warmup_cosine", final_lr_frac=0.1)
    steps = {"quick": 200, "full": 2000, "tiny": 4}[variant]
    cfg.train = common.train(steps=steps, batch_size=8 if not tiny else 4, log_every=20 if not tiny else 2,
                             eval_every=100 if not tiny else 4, eval_batches=8 if not tiny else 1)  # fmt: skip
    cfg.ckpt = common.ckpt(every_steps=100 if not tiny else 2, keep=2, best_metric="")
    cfg.eval = base.eval
    return cfg
