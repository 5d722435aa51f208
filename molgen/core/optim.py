"""Optimisers by name and learning-rate schedules (config group `optim`).

Chain order, as in the reference recipes: gradient clip -> weight decay -> optimiser.
AdamW takes its decoupled weight decay inside; the others get `add_decayed_weights`
before the update (masked to matrices: norms, biases and scalars are not decayed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adabelief", "yogi", "lion", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "wsd")


def _decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def wsd_schedule(peak: float, warmup: int, period: int, decay_frac: float, total: int | None = None):
    """Warmup-stable-decay, repeated: linear warmup, then the peak, decaying linearly to 0
    over the last `decay_frac` of every `period` steps before each checkpoint boundary
    (multiples of `period`), back to the peak right after it (REFERENCE.md "WSDS").
    With `total`, the final (possibly shorter) period also ends at 0 at `total`."""
    decay_len = max(1, int(round(period * decay_frac)))

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / max(1, warmup))
        end = (jnp.floor(step / period) + 1) * period
        if total is not None:
            end = jnp.minimum(end, float(total))
        to_end = end - step
        decay = jnp.clip(to_end / decay_len, 0.0, 1.0)
        return jnp.where(step < warmup, warm, peak * decay)

    return fn


def make_schedule(cfg, total_steps: int):
    name = cfg.schedule
    if name == "constant":
        return optax.constant_schedule(cfg.lr)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, max(1, cfg.warmup_steps), max(cfg.warmup_steps + 1, total_steps), cfg.lr * cfg.final_lr_frac
        )
    if name == "wsd":
        period = cfg.wsd_period or total_steps
        return wsd_schedule(cfg.lr, cfg.warmup_steps, period, cfg.wsd_decay_frac, total_steps)
    raise ValueError(f"optim.schedule={name!r} is not one of {SCHEDULES}")


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, callable]:
    """(optimizer, schedule) from an `optim` config group."""
    sched = make_schedule(cfg, total_steps)
    name = cfg.name
    b1, b2 = cfg.b1, cfg.b2
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    if name == "adamw":
        chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask))
        return optax.chain(*chain), sched
    if cfg.weight_decay:
        chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
    if name == "adabelief":
        chain.append(optax.adabelief(sched, b1=b1, b2=b2, eps=cfg.eps))
    elif name == "yogi":
        chain.append(optax.yogi(sched, b1=b1, b2=b2, eps=cfg.eps))
    elif name == "lion":
        chain.append(optax.lion(sched, b1=b1, b2=b2))
    elif name == "sgd":
        chain.append(optax.sgd(sched, momentum=b1 or None))
    else:
        raise ValueError(f"optim.name={name!r} is not one of {OPTIMIZERS}")
    return optax.chain(*chain), sched


def per_member(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimiser applied independently to each member of a stacked ensemble (leading axis
    of every parameter): clipping norms, moments and step counts are per member, so a vmapped
    ensemble trains exactly like its members would one by one on the same batches."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))
