"""Config groups every family shares: optim, ckpt, train, mesh, and the top-level fields."""

import ml_collections


def optim(**kw) -> ml_collections.ConfigDict:
    cfg = dict(
        name="adamw",
        lr=8e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,
        schedule="wsd",
        warmup_steps=100,
        final_lr_frac=0.0,
        wsd_period=0,
        wsd_decay_frac=0.1,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def ckpt(**kw) -> ml_collections.ConfigDict:
    cfg = dict(
        every_steps=200, keep=3, keep_best=1, best_metric="eval/loss", best_mode="min", async_save=True, init_from=""
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def train(**kw) -> ml_collections.ConfigDict:
    cfg = dict(steps=1000, batch_size=32, log_every=20, eval_every=200, eval_batches=8, seed=0)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def check_variant(variant: str, choices=("quick", "full")) -> str:
    if variant not in choices:
        raise ValueError(f"unknown variant {variant!r}; use {' or '.join(choices)}")
    return variant


def base(family: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.family = family
    cfg.mesh = ml_collections.ConfigDict(dict(num_devices=0))
    cfg.optim = optim()
    cfg.ckpt = ckpt()
    cfg.train = train()
    return cfg
