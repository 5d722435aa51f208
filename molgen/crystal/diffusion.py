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


def masked_gaussian_logprob(x, mean, std, mask, reduce: str = "mean"):
    """log N(x; mean, std²) per crystal (std: (B,)) over its real atoms and latent dims:
    `reduce="mean"` averages over them (Chemeleon2's RL policy, the default), "sum" sums them.
    0 where std = 0 (a deterministic step)."""
    var = jnp.maximum(std**2, 1e-20)[:, None, None]
    lp = -0.5 * ((x - mean) ** 2 / var + jnp.log(2 * jnp.pi * var))
    lp = (lp * mask[..., None]).sum((-1, -2))
    if reduce == "mean":
        lp = lp / jnp.maximum(mask.sum(-1) * x.shape[-1], 1)
    elif reduce != "sum":
        raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'sum'")
    return jnp.where(std > 0, lp, 0.0)


def ddim_coefficients(schedule: Schedule, t, t_prev, eta):
    """(√ᾱ_t, √(1-ᾱ_t), √ᾱ_prev, σ, √(1-ᾱ_prev-σ²)) of a DDIM step t -> t_prev (t_prev < 0: the data)."""
    ab = schedule.alpha_bar
    a_t = ab[t]
    a_p = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], 1.0)
    std = eta * jnp.sqrt((1 - a_p) / (1 - a_t)) * jnp.sqrt(jnp.maximum(1 - a_t / a_p, 0.0))
    return jnp.sqrt(a_t), jnp.sqrt(1 - a_t), jnp.sqrt(a_p), std, jnp.sqrt(jnp.maximum(1 - a_p - std**2, 0.0))


def ddim_mean(schedule: Schedule, x, eps, t, t_prev, eta):
    """(mean, σ) of the DDIM step's Gaussian policy over x_{t_prev}."""
    s_t, s1_t, s_p, std, dir_p = ddim_coefficients(schedule, t, t_prev, eta)
    return s_p * (x - s1_t * eps) / s_t + dir_p * eps, std


def ddim_step(schedule: Schedule, x, eps, t, t_prev, eta, noise, mask, reduce: str = "mean"):
    """One DDIM step from t to t_prev (t_prev < 0: to the data). Returns (x_prev, mean, std,
    log-probability of x_prev under the step's Gaussian, reduced by `reduce`)."""
    mean, std = ddim_mean(schedule, x, eps, t, t_prev, eta)
    x_prev = (mean + std * noise) * mask[..., None]
    return x_prev, mean, std, masked_gaussian_logprob(x_prev, mean, jnp.full(x.shape[:1], std), mask, reduce)


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


def ddim_schedule(schedule: Schedule, steps: int):
    """(t, t_prev) of each DDIM step, t_prev = -1 for the last (to the data)."""
    ts = ddim_timesteps(schedule.T, steps)
    return ts, np.concatenate([ts[1:], [-1]]).astype(np.int32)


def sample(apply, params, schedule: Schedule, rng, mask, latent: int, *, steps: int = 50, eta: float = 0.0,
           cond: dict | None = None, guidance: float = 1.0, ancestral: bool = False, x_init=None,
           reduce: str = "mean", trajectory: bool = False):  # fmt: skip
    """z_0 latents (B, N, latent) for the atom masks `mask`, from DDIM (`steps`, `eta`) or the
    full ancestral chain (`apply(params, z, t, mask, **conditions) -> ε`), and the per-step
    log-probabilities (DDIM, reduced by `reduce`) summed over the steps (0 for the ancestral
    chain and for η = 0). `x_init`: the starting noise z_T (default: drawn from `rng`).
    `trajectory=True` (DDIM) returns (z_0, {"z": (S+1, B, N, latent) from z_T to z_0,
    "logp": (S, B) per step, "t", "t_prev": (S,)}) instead: what RL over the chain stores."""
    cond = cond or {}
    k0, k1 = jax.random.split(rng)
    x = jax.random.normal(k0, (*mask.shape, latent)) if x_init is None else x_init
    x = x * mask[..., None]
    if ancestral:
        if trajectory:
            raise ValueError("trajectory=True needs the DDIM sampler (ancestral=False)")
        ts = jnp.arange(schedule.T - 1, -1, -1, dtype=jnp.int32)

        def body(x, inp):
            t, key = inp
            eps = guided_eps(apply, params, x, t, mask, cond, guidance)
            return ancestral_step(schedule, x, eps, t, jax.random.normal(key, x.shape), mask), None

        x, _ = jax.lax.scan(body, x, (ts, jax.random.split(k1, schedule.T)))
        return x, jnp.zeros(mask.shape[0])
    ts, prev = ddim_schedule(schedule, steps)

    def body(x, inp):
        t, tp, key = inp
        eps = guided_eps(apply, params, x, t, mask, cond, guidance)
        x, _, _, step_lp = ddim_step(schedule, x, eps, t, tp, eta, jax.random.normal(key, x.shape), mask, reduce)
        return x, (x, step_lp) if trajectory else step_lp

    x_T = x
    x, out = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev), jax.random.split(k1, len(ts))))
    if not trajectory:
        return x, out.sum(0)
    zs, lps = out
    return x, {"z": jnp.concatenate([x_T[None], zs]), "logp": lps, "t": jnp.asarray(ts), "t_prev": jnp.asarray(prev)}


def trajectory_logprobs(apply, params, schedule: Schedule, traj: dict, mask, eta: float, *, cond: dict | None = None,
                        guidance: float = 1.0, reduce: str = "mean", remat: bool = True):  # fmt: skip
    """Per-step log-probabilities (S, B) of a stored DDIM trajectory (`sample(..., trajectory=True)`)
    under `params`, and the per-step σ (S,): log N(z_{i+1}; mean_params(z_i, t_i), σ_i²). With the
    rollout's own parameters this reproduces `traj["logp"]` (ratio 1). Each DiT call is
    rematerialised (`remat`), so the memory of the backward pass does not grow with the steps."""
    cond = cond or {}

    def one(z, z_next, t, tp):
        eps = guided_eps(apply, params, z, t, mask, cond, guidance)
        mean, std = ddim_mean(schedule, z, eps, t, tp, eta)
        return masked_gaussian_logprob(z_next, mean, jnp.full(z.shape[:1], std), mask, reduce), std

    one = jax.checkpoint(one) if remat else one

    def body(_, inp):
        return None, one(*inp)

    z = traj["z"]
    _, (lp, std) = jax.lax.scan(body, None, (z[:-1], z[1:], traj["t"], traj["t_prev"]))
    return lp, std


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
