"""Post-training losses and the dynamic-beta rules (REFERENCE.md section 1), as pure functions.

GRPO (as in TRL):
- advantages A_i = r_i - mean_group(r), divided by (std_group + 1e-4) when `scale` (std with
  Bessel's correction, as torch.std);
- ratio rho = pi/pi_old per token, or per sequence (exp of the masked mean token log-ratio,
  broadcast to the sequence's tokens);
- per-token loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta KL, KL the k3
  estimator exp(ref - logp) - (ref - logp) - 1;
- normalisation by loss type, returned as (loss_sum, weight) for molgen's step builder, which
  divides the global psum of loss_sum by the global psum of weight:
  `grpo` token mean per sequence then mean over sequences (weight = sequences);
  `bnpo` sum / tokens of the device's batch (weight 1 per device: the mean of per-device means);
  `dr_grpo` sum / (sequences x max_completion_len); `dapo` sum / active tokens of the whole
  global batch. On one device bnpo and dapo coincide.

DPO: margin M = (logpi(y_w) - logpi(y_l)) - (logref(y_w) - logref(y_l)) of summed token
log-probs; losses sigmoid -log s(beta M), ipo (M - 1/(2 beta))^2, hinge max(0, 1 - beta M),
robust (label-noise robust, Chowdhury et al. 2024) with label smoothing eps. Given token counts,
`dpo_margin` uses each completion's mean token log-prob instead of the sum (TRL's `ipo`, which
divides policy and reference log-probs by the completion's token count; lm_dpo's
`dpo.ipo_normalize`).
The risk/quantile controller (`RiskBeta`) and beta-DPO's batch rule (`beta_dpo_select`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def group_advantages(rewards_PxG, scale: bool = True, eps: float = 1e-4, zero_std: float = 0.0):
    """A = r - mean over the group, / (std (ddof 1) + eps) when `scale`; A = 0 for a group whose
    std is below `zero_std` (Chemeleon2's guard, 1e-4: a group of near-ties teaches nothing)."""
    r = jnp.asarray(rewards_PxG, jnp.float32)
    adv = r - r.mean(axis=-1, keepdims=True)
    std = jnp.std(r, axis=-1, ddof=1, keepdims=True)
    if scale:
        adv = adv / (std + eps)
    return jnp.where(std < zero_std, 0.0, adv)


def k3_kl(logp, ref_logp):
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(
    logp_BxT,
    old_logp_BxT,
    adv_B,
    mask_BxT,
    *,
    eps_low: float,
    eps_high: float,
    loss_type: str = "grpo",
    ratio_level: str = "token",
    beta: float = 0.0,
    ref_logp_BxT=None,
    max_len: int | None = None,
):
    """(loss_sum, weight, stats): loss = loss_sum / weight for this batch on one device."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"grpo.ratio_level={ratio_level!r} is not 'token' or 'sequence'")
    mask = mask_BxT.astype(jnp.float32)
    n_tok = mask.sum(-1)
    log_ratio = logp_BxT - old_logp_BxT
    if ratio_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / jnp.maximum(n_tok, 1.0))[:, None]
    coef1 = jnp.exp(log_ratio)
    coef2 = jnp.clip(coef1, 1.0 - eps_low, 1.0 + eps_high)
    a = adv_B[:, None]
    per_tok = -jnp.minimum(coef1 * a, coef2 * a)
    kl = jnp.zeros_like(logp_BxT) if ref_logp_BxT is None else k3_kl(logp_BxT, ref_logp_BxT)
    if beta:
        per_tok = per_tok + beta * kl
    per_tok = jnp.broadcast_to(per_tok, mask.shape) * mask
    b = jnp.float32(mask.shape[0])
    if loss_type == "grpo":
        loss_sum, weight = (per_tok.sum(-1) / jnp.maximum(n_tok, 1.0)).sum(), b
    elif loss_type == "bnpo":
        loss_sum, weight = per_tok.sum() / jnp.maximum(mask.sum(), 1.0), jnp.float32(1.0)
    elif loss_type == "dr_grpo":
        loss_sum, weight = per_tok.sum() / float(max_len or mask.shape[1]), b
    else:
        loss_sum, weight = per_tok.sum(), mask.sum()
    coef = jnp.broadcast_to(coef1, mask.shape)
    low = ((coef < 1.0 - eps_low) & (a < 0)).astype(jnp.float32) * mask
    high = ((coef > 1.0 + eps_high) & (a > 0)).astype(jnp.float32) * mask
    tok = jnp.maximum(mask.sum(), 1.0)
    stats = {
        "clip_low": low.sum() / tok,
        "clip_high": high.sum() / tok,
        "clip_frac": (low + high).sum() / tok,
        "kl": (kl * mask).sum() / tok,
        "ratio": (coef * mask).sum() / tok,
    }
    return loss_sum, weight, stats


def dpo_margin(pol_chosen, pol_rejected, ref_chosen, ref_rejected, n_chosen=None, n_rejected=None):
    """M from summed completion log-probs; with the token counts n_chosen / n_rejected, from
    mean token log-probs (policy and reference divided by the same count, as TRL's `ipo`)."""
    if n_chosen is None:
        return (pol_chosen - pol_rejected) - (ref_chosen - ref_rejected)
    c, r = jnp.maximum(n_chosen, 1.0), jnp.maximum(n_rejected, 1.0)
    return (pol_chosen - ref_chosen) / c - (pol_rejected - ref_rejected) / r


def dpo_loss(margin, beta, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO loss from margins M (beta a scalar or per-pair array)."""
    z = beta * margin
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(z) * (1.0 - label_smoothing) - jax.nn.log_sigmoid(-z) * label_smoothing
    if loss_type == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    raise ValueError(f"dpo.loss={loss_type!r} is not one of {DPO_LOSSES}")


def rpo_nll(chosen_logp_sum, chosen_tokens, alpha: float):
    """RPO's extra term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"):
    alpha x the chosen completion's mean token negative log-likelihood, added to each pair's
    DPO loss so that the chosen side's likelihood cannot fall while the margin grows."""
    return -alpha * chosen_logp_sum / jnp.maximum(chosen_tokens, 1.0)


class RiskBeta:
    """The seed project's risk/quantile dynamic beta, on the host, one update per step.

    Warmup (the first `warmup_steps` steps): beta stays beta0 and every margin is kept; at the
    last warmup step tau0 = the (1 - delta) quantile of all of them. After warmup, each step:
    tau <- (1 - lam) tau + lam quantile_{1-delta}(batch margins); p = share of batch margins
    >= tau; u = (p - delta) / sqrt(delta (1 - delta) / n); beta <- clip(beta exp(alpha
    tanh(gamma u)), beta_min, beta_max). The loss of a step uses the beta from before its
    update, so a new beta applies from the next step. Quantiles interpolate linearly (numpy's
    and torch's default).
    """

    def __init__(self, beta0=0.1, delta=0.1, lam=0.1, gamma=2.0, alpha=0.005, beta_min=0.0, beta_max=2.0, warmup=120):
        self.delta, self.lam, self.gamma, self.alpha = delta, lam, gamma, alpha
        self.beta_min, self.beta_max, self.warmup = beta_min, beta_max, warmup
        # without warmup tau starts at 0, as in the seed
        self.beta, self.tau, self.count, self.buffer = float(beta0), (0.0 if warmup <= 0 else None), 0, []

    def update(self, margins) -> dict:
        m = np.asarray(margins, np.float64).ravel()
        self.count += 1
        q = 1.0 - self.delta
        if self.count <= self.warmup:
            self.buffer.extend(float(x) for x in m)
            if self.count == self.warmup:
                self.tau, self.buffer = float(np.quantile(self.buffer, q)), []
            return {"beta": self.beta, "warmup": 1.0, **({"tau": self.tau} if self.tau is not None else {})}
        batch_q = float(np.quantile(m, q))
        self.tau = (1.0 - self.lam) * self.tau + self.lam * batch_q
        p = float(np.mean(m >= self.tau))
        u = (p - self.delta) / np.sqrt(self.delta * (1.0 - self.delta) / len(m))
        beta = self.beta * np.exp(self.alpha * np.tanh(self.gamma * u))
        self.beta = float(np.clip(beta, self.beta_min, self.beta_max))
        return {"beta": self.beta, "tau": self.tau, "p_hat": p, "u": float(u), "warmup": 0.0}

    def state_dict(self) -> dict:
        return {"beta": self.beta, "tau": self.tau, "count": self.count, "buffer": list(self.buffer)}

    def load(self, d: dict | None):
        if d:
            self.beta, self.tau, self.count, self.buffer = d["beta"], d["tau"], d["count"], list(d["buffer"])


def beta_dpo_select(gap_N, m0, s, initialized, rng, *, beta0, a, drop, momentum, min_beta, eps=1e-6):
    """beta-DPO (Wu et al. 2024) on one global batch of gaps (stop-gradient margins).

    EMA (momentum) of the batch mean M0 and std s (initialised from the first batch); pairs are
    kept by sampling round(N (1 - drop)) of them without replacement (Gumbel top-k) with
    weights exp(-((M - M0)/s)^2 / 2); beta = max(beta0 (1 + a (mean kept M - M0)), min_beta).
    Returns (keep mask [N], beta, new M0, new s)."""
    n = gap_N.shape[0]
    bm, bs = gap_N.mean(), jnp.maximum(gap_N.std(), eps)
    m0 = jnp.where(initialized, momentum * m0 + (1.0 - momentum) * bm, bm)
    s = jnp.where(initialized, jnp.maximum(momentum * s + (1.0 - momentum) * bs, eps), bs)
    logw = -0.5 * ((gap_N - m0) / (s + eps)) ** 2
    k = max(1, int(n * (1.0 - drop)))
    keys = logw + jax.random.gumbel(rng, (n,))
    keep = jnp.zeros((n,), bool).at[jax.lax.top_k(keys, k)[1]].set(True)
    kept_mean = jnp.sum(jnp.where(keep, gap_N, 0.0)) / k
    beta = jnp.maximum(beta0 * (1.0 + a * (kept_mean - m0)), min_beta)
    return keep, beta, m0, s
