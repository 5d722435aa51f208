"""Crystal VAE (Chemeleon2-style, REFERENCE.md 3): transformer encoder and decoder over atom
tokens with a per-atom Gaussian latent.

Token input = species embedding + MLP(lattice matrix) + MLP(Fourier features of the
fractional coordinates) + index embedding. The Fourier features sin/cos(2πk·x) are periodic,
so a shift by a lattice vector leaves the encoder's input unchanged. Decoder heads: species
logits, fractional coordinates (trained with the wrapped difference x̂ - x - round(x̂ - x), so
the loss is periodic, unlike the reference's), and lattice lengths / N^(1/3) and angles
(radians) read from the masked mean of the tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

N_SPECIES = 100  # atomic numbers 1..100 -> classes 0..99


def fourier(frac, k: int):
    """(..., 3) fractional coordinates -> (..., 6k) periodic features."""
    freqs = 2 * jnp.pi * jnp.arange(1, k + 1, dtype=frac.dtype)
    ang = frac[..., None] * freqs
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(*frac.shape[:-1], -1)


def wrap(d):
    """Periodic difference of fractional coordinates, in [-0.5, 0.5)."""
    return d - jnp.round(d)


class Mlp(nn.Module):
    features: tuple

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.silu(x)
        return x


class Block(nn.Module):
    """Pre-LN transformer block with a key mask; `mod` (B, 6d) turns it into an adaLN-Zero
    block (shift, scale, gate for attention and MLP), as in DiT."""

    dim: int
    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x, mask, mod=None):
        if mod is None:
            sh1 = sc1 = sh2 = sc2 = 0.0
            g1 = g2 = 1.0
        else:
            sh1, sc1, g1, sh2, sc2, g2 = (m[:, None, :] for m in jnp.split(mod, 6, axis=-1))
        attn_mask = mask[:, None, None, :] & mask[:, None, :, None]
        h = nn.LayerNorm(use_scale=mod is None, use_bias=mod is None)(x) * (1 + sc1) + sh1
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(h, h, mask=attn_mask)
        x = x + g1 * h
        h = nn.LayerNorm(use_scale=mod is None, use_bias=mod is None)(x) * (1 + sc2) + sh2
        h = Mlp((self.mlp_ratio * self.dim, self.dim))(h)
        return (x + g2 * h) * mask[..., None]


def masked_mean(x, mask):
    m = mask[..., None].astype(x.dtype)
    return (x * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)


class CrystalVAE(nn.Module):
    dim: int = 128
    heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    latent: int = 8
    n_max: int = 20
    n_fourier: int = 4

    def setup(self):
        self.species_embed = nn.Embed(N_SPECIES + 1, self.dim)
        self.index_embed_enc = nn.Embed(self.n_max, self.dim)
        self.index_embed_dec = nn.Embed(self.n_max, self.dim)
        self.lattice_in = Mlp((self.dim, self.dim))
        self.frac_in = Mlp((self.dim, self.dim))
        self.encoder = [Block(self.dim, self.heads) for _ in range(self.enc_layers)]
        self.to_latent = nn.Dense(2 * self.latent)
        self.from_latent = nn.Dense(self.dim)
        self.decoder = [Block(self.dim, self.heads) for _ in range(self.dec_layers)]
        self.out_norm = nn.LayerNorm()
        self.species_head = nn.Dense(N_SPECIES)
        self.frac_head = Mlp((self.dim, 3))
        self.lattice_head = Mlp((self.dim, self.dim, 6))

    def encode(self, species, frac, lattice, mask):
        """-> (mean, log variance), each (B, N, latent)."""
        mu, logvar = jnp.split(self.to_latent(self.tokens(species, frac, lattice, mask)), 2, axis=-1)
        return mu * mask[..., None], jnp.clip(logvar, -12.0, 6.0) * mask[..., None]

    def tokens(self, species, frac, lattice, mask):
        """The encoder's last hidden states (B, N, dim)."""
        n = mask.sum(-1).astype(jnp.float32)
        scale = jnp.cbrt(jnp.maximum(n, 1.0))[:, None] * 3.0  # lattice rows ~ N^(1/3) * 3 Å
        lat = self.lattice_in(lattice.reshape(lattice.shape[0], 9) / scale)
        idx = jnp.arange(species.shape[1])
        x = self.species_embed(jnp.where(mask, species, 0)) + lat[:, None, :]
        x = x + self.frac_in(fourier(frac, self.n_fourier)) + self.index_embed_enc(idx)[None]
        x = x * mask[..., None]
        for blk in self.encoder:
            x = blk(x, mask)
        return x

    def decode(self, z, mask):
        """-> dict(species_logits (B,N,100), frac (B,N,3), lengths (B,3) / N^(1/3), angles (B,3) rad)."""
        idx = jnp.arange(z.shape[1])
        x = (self.from_latent(z) + self.index_embed_dec(idx)[None]) * mask[..., None]
        for blk in self.decoder:
            x = blk(x, mask)
        x = self.out_norm(x)
        lat = self.lattice_head(masked_mean(x, mask))
        return {
            "species_logits": self.species_head(x),
            "frac": self.frac_head(x),
            "lengths": nn.softplus(lat[:, :3]) + 0.5,
            "angles": jnp.pi / 6 + (2 * jnp.pi / 3) * nn.sigmoid(lat[:, 3:]),  # 30..150 degrees
        }

    def features(self, species, frac, lattice, mask):
        """Pooled encoder features (B, dim + latent): masked means of the last hidden states and
        of the latent means; what the property predictor reads."""
        x = self.tokens(species, frac, lattice, mask)
        mu = self.to_latent(x)[..., : self.latent]
        return jnp.concatenate([masked_mean(x, mask), masked_mean(mu, mask)], axis=-1)

    def __call__(self, species, frac, lattice, mask, rng):
        mu, logvar = self.encode(species, frac, lattice, mask)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape) * mask[..., None]
        return self.decode(z, mask), mu, logvar


def random_rotation(rng, batch: int):
    """(batch, 3, 3) uniformly random rotations (QR of Gaussian matrices, sign-fixed, det +1)."""
    q, r = jnp.linalg.qr(jax.random.normal(rng, (batch, 3, 3)))
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    det = jnp.linalg.det(q)
    return q.at[:, :, 0].multiply(det[:, None])


def augment(rng, lattice, frac, rotate: bool, translate: bool):
    """Random rotation of the lattice (rows rotate: L R^T) and a random translation of every
    atom of a crystal by the same fractional vector (wrapped)."""
    k1, k2 = jax.random.split(rng)
    if rotate:
        lattice = jnp.einsum("bij,bkj->bik", lattice, random_rotation(k1, lattice.shape[0]))
    if translate:
        frac = jnp.mod(frac + jax.random.uniform(k2, (frac.shape[0], 1, 3)), 1.0)
    return lattice, frac


def lattice_targets(params, mask):
    """(lengths / N^(1/3), angles in radians) of (a, b, c, α, β, γ) lattice parameters."""
    n = jnp.maximum(mask.sum(-1).astype(jnp.float32), 1.0)
    return params[:, :3] / jnp.cbrt(n)[:, None], jnp.deg2rad(params[:, 3:])


def loss_terms(out, mu, logvar, batch):
    """Per-crystal loss terms (B,): species CE, wrapped coordinate MSE, lengths MSE, angles MSE,
    KL (summed over latent dims, averaged over atoms); and species accuracy."""
    mask = batch["mask"]
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(-1), 1.0)
    labels = jnp.clip(batch["species"] - 1, 0, N_SPECIES - 1)
    logp = jax.nn.log_softmax(out["species_logits"])
    ce = -(jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * m).sum(-1) / n
    acc = ((out["species_logits"].argmax(-1) == labels) * m).sum(-1) / n
    coord = ((wrap(out["frac"] - batch["frac"]) ** 2).sum(-1) * m).sum(-1) / n
    lengths, angles = lattice_targets(batch["params"], mask)
    len_mse = ((out["lengths"] - lengths) ** 2).mean(-1)
    ang_mse = ((out["angles"] - angles) ** 2).mean(-1)
    kl = (0.5 * (jnp.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1) * m).sum(-1) / n
    return {"species_ce": ce, "coords": coord, "lengths": len_mse, "angles": ang_mse, "kl": kl, "species_acc": acc}


def make_loss(model: CrystalVAE, weights, augment_cfg):
    """loss_fn(params, batch, rng) -> (sum over crystals, aux sums) for core.step."""

    def loss_fn(params, batch, rng):
        k_aug, k_z = jax.random.split(rng)
        lattice, frac = augment(k_aug, batch["lattice"], batch["frac"], augment_cfg.rotate, augment_cfg.translate)
        b = {**batch, "lattice": lattice, "frac": frac}
        out, mu, logvar = model.apply({"params": params}, b["species"], frac, lattice, b["mask"], k_z)
        t = loss_terms(out, mu, logvar, b)
        total = (weights.species * t["species_ce"] + weights.coords * t["coords"] + weights.lengths * t["lengths"]
                 + weights.angles * t["angles"] + weights.kl * t["kl"])  # fmt: skip
        aux = {k: v.sum() for k, v in t.items()}
        aux.update(loss=total.sum(), weight=jnp.asarray(total.shape[0], jnp.float32))
        return total.sum(), aux

    return loss_fn
