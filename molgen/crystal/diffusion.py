"""Latent diffusion over per-atom VAE latents (REFERENCE.md 3): a DiT with adaLN-Zero, a linear-β
1000-step schedule with ε-prediction, DDIM and ancestral samplers, classifier-free guidance.

Every sampler step is a Gaussian policy x_{s} ~ N(mean(x_t), σ_t² I) over the real atoms'
latents; `ddim_step` returns the log-probability of the step it takes (the quantity GRPO over
the chain needs). With η = 0 the step is deterministic (σ = 0) and its log-probability is
reported as 0.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molgen.crystal.vae import N_SPECIES, Block, Mlp


@dataclasses.dataclass(frozen=True)
class Schedule:
    betas: np.ndarray

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        return cls(np.linspace(beta_start, beta_end, steps, dtype=np.float64))

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alpha_bar(self) -> jnp.ndarray:
        return jnp.asarray(np.cumprod(1.0 - self.betas), jnp.float32)


def timestep_embedding(t, dim: int):
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / half)
    ang = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class DiT(nn.Module):
    """ε(z_t, t, conditions) over masked per-atom latents. Conditions (each optional, each with
    a learned null embedding used where its drop flag is set): `composition` (B, 100) element
    fractions and `prop` (B,) a scalar property. A condition passed as None is dropped for the
    whole batch (unconditional sampling)."""

    dim: int = 256
    heads: int = 8
    layers: int = 6
    latent: int = 8
    n_max: int = 20
    use_composition: bool = False
    use_property: bool = False

    @nn.compact
    def __call__(self, z, t, mask, composition=None, comp_drop=None, prop=None, prop_drop=None):
        b, n = mask.shape
        c = Mlp((self.dim, self.dim))(timestep_embedding(t, self.dim))
        if self.use_composition:
            if composition is None:
                composition, comp_drop = jnp.zeros((b, N_SPECIES)), jnp.ones((b,), bool)
            e = Mlp((self.dim, self.dim))(composition)
            null = self.param("null_composition", nn.initializers.normal(0.02), (self.dim,))
            c = c + jnp.where(comp_drop[:, None], null[None], e)
        if self.use_property:
            if prop is None:
                prop, prop_drop = jnp.zeros((b,)), jnp.ones((b,), bool)
            k = jnp.arange(1, 9, dtype=jnp.float32)
            feats = jnp.concatenate([prop[:, None], jnp.sin(prop[:, None] * k), jnp.cos(prop[:, None] * k)], -1)
            e = Mlp((self.dim, self.dim))(feats)
            null = self.param("null_property", nn.initializers.normal(0.02), (self.dim,))
            c = c + jnp.where(prop_drop[:, None], null[None], e)
        x = nn.Dense(self.dim)(z) + nn.Embed(self.n_max, self.dim)(jnp.arange(n))[None]
        x = x * mask[..., None]
        zeros = nn.initializers.zeros
        for _ in range(self.layers):
            mod = nn.Dense(6 * self.dim, kernel_init=zeros, bias_init=zeros)(nn.silu(c))
            x = Block(self.dim, self.heads)(x, mask, mod)
        shift, scale = jnp.split(nn.Dense(2 * self.dim, kernel_init=zeros, bias_init=zeros)(nn.silu(c)), 2, -1)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x) * (1 + scale[:, None]) + shift[:, None]
        return nn.Dense(self.latent, kernel_init=zeros, bias_init=zeros)(x) * mask[..., None]


def composition(species, mask):
    """(B, N) atomic numbers -> (B, 100) element fractions."""
    onehot = jax.nn.one_hot(jnp.clip(species - 1, 0, N_SPECIES - 1), N_SPECIES) * mask[..., None]
    return onehot.sum(1) / jnp.maximum(mask.sum(-1, keepdims=True), 1)


def q_sample(schedule: Schedule, x0, t, noise):
    ab = schedule.alpha_bar[t][:, None, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def masked_gaussian_logprob(x, mean, std, mask):
    """Σ over real atoms and latent dims of log N(x; mean, std²), per crystal (std: (B,)); 0
    where std = 0."""
    var = jnp.maximum(std**2, 1e-20)[:, None, None]
    lp = -0.5 * ((x - mean) ** 2 / var + jnp.log(2 * jnp.pi * var))
    lp = (lp * mask[..., None]).sum((-1, -2))
    return jnp.where(std > 0, lp, 0.0)


def ddim_step(schedule: Schedule, x, eps, t, t_prev, eta, noise, mask):
    """One DDIM step from t to t_prev (t_prev < 0: to the data). Returns (x_prev, mean, std,
    log-probability of x_prev under the step's Gaussian)."""
    ab = schedule.alpha_bar
    a_t = ab[t]
    a_p = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], 1.0)
    x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    std = eta * jnp.sqrt((1 - a_p) / (1 - a_t)) * jnp.sqrt(jnp.maximum(1 - a_t / a_p, 0.0))
    mean = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1 - a_p - std**2, 0.0)) * eps
    x_prev = (mean + std * noise) * mask[..., None]
    return x_prev, mean, std, masked_gaussian_logprob(x_prev, mean, jnp.full(x.shape[:1], std), mask)


def ancestral_step(schedule: Schedule, x, eps, t, noise, mask):
    """One DDPM ancestral step t -> t-1 with the posterior variance β̃_t."""
    ab = schedule.alpha_bar
    beta = jnp.asarray(schedule.betas, jnp.float32)[t]
    a_t, a_p = ab[t], jnp.where(t > 0, ab[jnp.maximum(t - 1, 0)], 1.0)
    mean = (x - beta / jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(1 - beta)
    std = jnp.sqrt(beta * (1 - a_p) / (1 - a_t))
    return (mean + jnp.where(t > 0, std, 0.0) * noise) * mask[..., None]


def ddim_timesteps(T: int, steps: int) -> np.ndarray:
    """Decreasing timesteps t_S > ... > t_1 = 0 spread evenly over [0, T-1]."""
    return np.unique(np.round(np.linspace(0, T - 1, steps)).astype(np.int32))[::-1].copy()


def guided_eps(apply, params, x, t, mask, cond: dict, scale: float):
    """ε with classifier-free guidance: ε_u + scale (ε_c - ε_u); `cond` holds the condition
    arrays (composition/prop); with scale 1 or no condition only the conditional pass runs."""
    b = x.shape[0]
    tt = jnp.full((b,), t, jnp.int32)
    if not cond or scale == 1.0:
        return apply(params, x, tt, mask, **_with_drops(cond, jnp.zeros((b,), bool)))
    both = {k: jnp.concatenate([v, v]) for k, v in cond.items()}
    drops = _with_drops(both, jnp.arange(2 * b) >= b)  # the second half is the unconditional pass
    eps = apply(params, jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), jnp.concatenate([mask, mask]), **drops)
    e_c, e_u = eps[:b], eps[b:]
    return e_u + scale * (e_c - e_u)


def _with_drops(cond: dict, flag):
    """Condition kwargs for the DiT: every condition present gets the per-row drop `flag`."""
    out = dict(cond)
    if "composition" in cond:
        out["comp_drop"] = flag
    if "prop" in cond:
        out["prop_drop"] = flag
    return out


def sample(apply, params, schedule: Schedule, rng, mask, latent: int, *, steps: int = 50, eta: float = 0.0,
           cond: dict | None = None, guidance: float = 1.0, ancestral: bool = False, x_init=None):  # fmt: skip
    """z_0 latents (B, N, latent) for the atom masks `mask`, from DDIM (`steps`, `eta`) or the
    full ancestral chain (`apply(params, z, t, mask, **conditions) -> ε`); also returns the
    summed per-step log-probabilities (DDIM; 0 for the ancestral chain and for η = 0).
    `x_init`: the starting noise z_T (default: drawn from `rng`)."""
    cond = cond or {}
    k0, k1 = jax.random.split(rng)
    x = jax.random.normal(k0, (*mask.shape, latent)) if x_init is None else x_init
    x = x * mask[..., None]
    if ancestral:
        ts = jnp.arange(schedule.T - 1, -1, -1, dtype=jnp.int32)

        def body(x, inp):
            t, key = inp
            eps = guided_eps(apply, params, x, t, mask, cond, guidance)
            return ancestral_step(schedule, x, eps, t, jax.random.normal(key, x.shape), mask), None

        x, _ = jax.lax.scan(body, x, (ts, jax.random.split(k1, schedule.T)))
        return x, jnp.zeros(mask.shape[0])
    ts = ddim_timesteps(schedule.T, steps)
    prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)

    def body(carry, inp):
        x, lp = carry
        t, tp, key = inp
        eps = guided_eps(apply, params, x, t, mask, cond, guidance)
        x, _, _, step_lp = ddim_step(schedule, x, eps, t, tp, eta, jax.random.normal(key, x.shape), mask)
        return (x, lp + step_lp), None

    (x, lp), _ = jax.lax.scan(body, (x, jnp.zeros(mask.shape[0])), (jnp.asarray(ts), jnp.asarray(prev),
                                                                     jax.random.split(k1, len(ts))))  # fmt: skip
    return x, lp


def make_loss(apply, schedule: Schedule, encode, cfg):
    """ε-prediction loss over real atoms. `encode(batch) -> (z0 scaled, mask, cond dict)` runs
    the frozen VAE; conditions are dropped independently with probability cfg.drop."""

    def loss_fn(params, batch, rng):
        z0, mask, cond = encode(batch)
        b = z0.shape[0]
        k_t, k_n, k_c, k_p = jax.random.split(rng, 4)
        t = jax.random.randint(k_t, (b,), 0, schedule.T)
        noise = jax.random.normal(k_n, z0.shape) * mask[..., None]
        kw = dict(cond)
        if "composition" in cond:
            kw["comp_drop"] = jax.random.uniform(k_c, (b,)) < cfg.drop
        if "prop" in cond:
            kw["prop_drop"] = (jax.random.uniform(k_p, (b,)) < cfg.drop) | ~jnp.isfinite(cond["prop"])
            kw["prop"] = jnp.nan_to_num(cond["prop"])
        eps = apply(params, q_sample(schedule, z0, t, noise), t, mask, **kw)
        m = mask.astype(jnp.float32)
        per = (((eps - noise) ** 2).mean(-1) * m).sum(-1) / jnp.maximum(m.sum(-1), 1)
        return per.sum(), {"loss": per.sum(), "eps_mse": per.sum(), "weight": jnp.asarray(b, jnp.float32)}

    return loss_fn
