"""Allegro (strictly local, edge-based equivariant network) in Flax linen with e3nn-jax.

Per directed edge i -> j within the cutoff (REFERENCE.md section 2):
- scalar latent x_ij = MLP(Bessel(r_ij), emb(Z_i), emb(Z_j)) * u(r_ij), u a smooth polynomial
  envelope that vanishes at the cutoff;
- equivariant features V_ij = w(x_ij) * Y(r_hat_ij), one weight per channel and per l.
Each layer:
- env_i = sum over the edges k of centre i of w'(x_ik) * Y(r_hat_ik) / sqrt(avg_neighbours);
- T_ij = V_ij (x) env_i, channel by channel (e3nn tensor product);
- x_ij <- (x_ij + MLP(x_ij, scalars of T_ij) * u(r_ij)) / sqrt(2), V_ij <- Linear(T_ij).
Readout: an energy per edge from x_ij, summed into per-bead and total energies.

Edges come from a padded sparse neighbour list; entries with `valid` False (padding, or pairs
touching a padded bead) contribute nothing, and their geometry is replaced before any
division, so they cannot produce NaN in values or gradients.

`inner_cutoff` (set by the training driver to the shortest pair distance in the training data
plus `inner_width`) fades edges in over the shortest `inner_width` of the distances the network
was fitted on and removes every shorter one: a trained network extrapolates freely below its
data, and in MD it can pull beads together without bound (a switch that still let the
network act 0.02 Å below the data's shortest CA-CA bond let villin's quick model dig a
-180 kcal/mol hole by squeezing two bonds to 3.61 Å), while the priors' walls and bonds are
built for exactly that region.

`env_norm="count"` divides each environment sum by 1 + the bead's smooth neighbour count, so
the environment is a weighted mean and every per-edge feature and energy stays bounded however
dense the configuration: with the usual 1/sqrt(avg neighbours) a compacting protein sees its
environments, their tensor products and the network energy grow without bound, a funnel MD
falls into.
"""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from molgen.cg import geometry


def inner_switch(r, inner: float, width: float):
    """C2 smoothstep: 0 below inner - width, 1 above inner. Multiplied into the envelope, it
    removes a neighbour closer than the training data ever had from every edge feature and
    energy, so that at such distances the physics priors alone set the energy."""
    return geometry.smoothstep((r - (inner - width)) / width)


def _mlp(features, depth, width, name):
    return e3nn.flax.MultiLayerPerceptron(
        [width] * depth + [features], act=jax.nn.silu, output_activation=False, name=name
    )


def _per_l(y: e3nn.IrrepsArray, w_ExCxL):
    """Scale each l block of Y [E, dim] by its own weight per channel: [E, C, dim]."""
    reps = jnp.asarray([mul_ir.ir.dim * mul_ir.mul for mul_ir in y.irreps])
    w = jnp.repeat(w_ExCxL, reps, axis=-1, total_repeat_length=y.irreps.dim)
    return e3nn.IrrepsArray(y.irreps, y.array[:, None, :] * w)


class Allegro(nn.Module):
    n_species: int = 20
    cutoff: float = 12.0
    n_basis: int = 24
    n_layers: int = 3
    latent: int = 64
    channels: int = 8
    lmax: int = 2
    embed: int = 16
    mlp_depth: int = 2
    avg_neighbors: float = 20.0
    inner_cutoff: float = 0.0  # > 0: edges shorter than this fade out (see `inner_switch`)
    inner_width: float = 1.0
    env_norm: str = "avg"  # "avg": divide env sums by sqrt(avg_neighbors); "count": by 1 + sum of envelopes

    @nn.compact
    def __call__(self, positions_Nx3, species_N, centres_E, neighbours_E, valid_E, displacement=None):
        """Per-bead energies [N] (kcal/mol). `displacement(a, b) -> a - b` is a jax-md
        displacement function (periodic box, strained space); default plain differences."""
        n = positions_Nx3.shape[0]
        if displacement is None:
            vec = positions_Nx3[neighbours_E] - positions_Nx3[centres_E]
        else:
            vec = jax.vmap(displacement)(positions_Nx3[neighbours_E], positions_Nx3[centres_E])
        r = geometry.safe_norm(vec)
        live = valid_E & (r > 1e-6) & (r < self.cutoff)
        vec = jnp.where(live[:, None], vec, jnp.array([1.0, 0.0, 0.0]))
        r = jnp.where(live, r, 1.0)
        u = e3nn.poly_envelope(5, 2, self.cutoff)(r)
        if self.inner_cutoff > 0:
            u = u * inner_switch(r, self.inner_cutoff, self.inner_width)
        u = jnp.where(live, u, 0.0)[:, None]  # [E, 1]

        irreps_y = e3nn.Irreps.spherical_harmonics(self.lmax)
        y = e3nn.spherical_harmonics(irreps_y, vec, normalize=True, normalization="component")
        n_l = self.lmax + 1
        emb = nn.Embed(self.n_species, self.embed, name="species_embed")(species_N)
        basis = e3nn.bessel(r, self.n_basis, self.cutoff)
        x = jnp.concatenate([basis, emb[centres_E], emb[neighbours_E]], axis=-1)
        x = _mlp(self.latent, self.mlp_depth, self.latent, "two_body")(x) * u
        v = _per_l(y, nn.Dense(self.channels * n_l, name="v0")(x).reshape(-1, self.channels, n_l))
        if self.env_norm == "avg":
            norm = jnp.full((n, 1, 1), 1.0 / math.sqrt(self.avg_neighbors))
        elif self.env_norm == "count":
            norm = 1.0 / (1.0 + jax.ops.segment_sum(u[:, 0], centres_E, num_segments=n))[:, None, None]
        else:
            raise ValueError(f"env_norm must be 'avg' or 'count', got {self.env_norm!r}")
        for layer in range(self.n_layers):
            w = nn.Dense(self.channels * n_l, name=f"env_{layer}")(x).reshape(-1, self.channels, n_l)
            env_edge = _per_l(y, w).array * u[:, :, None]
            env = jax.ops.segment_sum(env_edge, centres_E, num_segments=n) * norm  # [N, C, dim]
            t = e3nn.tensor_product(v, e3nn.IrrepsArray(irreps_y, env[centres_E]), filter_ir_out=irreps_y)
            scalars = t.filter(keep="0e").array.reshape(t.shape[0], -1)
            x_new = _mlp(self.latent, self.mlp_depth, self.latent, f"latent_{layer}")(jnp.concatenate([x, scalars], -1))
            x = (x + x_new * u) / math.sqrt(2.0)
            if layer < self.n_layers - 1:
                v = e3nn.flax.Linear(irreps_y, name=f"linear_{layer}")(t)
        e_edge = _mlp(1, 1, self.latent, "readout")(x)[:, 0] * u[:, 0]
        e_edge = jnp.where(live, e_edge, 0.0)
        return jax.ops.segment_sum(e_edge, centres_E, num_segments=n)
