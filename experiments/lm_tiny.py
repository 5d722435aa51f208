"""Tiny LM run for tests and smoke checks (seconds on a CPU).

python -m molgen.main --config=experiments/lm_tiny.py --workdir=runs/lm_tiny
"""

import experiments.lm_quickstart as base  # noqa: E402
from configs import common, lm_models


def get_config():
    cfg = base.get_config()
    cfg.model = lm_models.get("test")
    cfg.data.update(dict(n_train=40, n_val=8, n_test=4, conformers=1, test_conformers=2, seq_len=256, packing_bins=4))
    cfg.optim = common.optim(lr=3e-3, warmup_steps=2)
    cfg.train = common.train(steps=12, batch_size=4, log_every=2, eval_every=6, eval_batches=2)
    cfg.ckpt = common.ckpt(every_steps=6)
    cfg.eval.update(dict(num_molecules=2, samples_per_ref=1, max_new_tokens=32, batch_size=4))
    return cfg
