"""ATOMICA's hierarchical equivariant encoder of interfaces in e3nn-jax (Flax linen).

Two levels, each a stack of tensor-product convolutions over the k-NN graphs of
`atomica.graph` (batch: one flat padded graph, `graph.collate`):
- atom level: atom-type embedding (32x0e) -> `layers` convolutions. A convolution takes, per
  edge j -> i, the spherical harmonics (l <= 2) of x_j - x_i and weights from an MLP over
  [32 Gaussians of the distance on 0-5 Å, the edge-type embedding, the scalars of i and j];
  messages are averaged over each receiver's edges, then an equivariant layer norm and a
  zero-padded residual. Irreps grow 32x0e -> +16x1o+16x2e -> +16x1e+16x2o -> +32x0o.
  `tp="fully_connected"`: every path (input irrep x harmonic -> output irrep) gets a
  per-edge weight matrix, ATOMICA's `FullyConnectedTensorProduct(shared_weights=False)`;
  `tp="depthwise"`: one per-edge weight per input channel and path, then a shared linear map
  (a fraction of the memory and time).
- block level: each block's type embedding attends (4 heads) over its atoms' outputs (residual,
  layer norm), then the same convolution stack with its own weights over the block graph
  (position: mean of the block's atoms; radial input: the closest atom-pair distance).
- scalars (0e and 0o) of each level -> MLP -> L2-normalised atom and block representations;
  the interface embedding: 4 self-attention layers over the blocks of each interface
  (residual, layer norm), summed, a linear map, L2-normalised.
Every output is invariant under rotations and translations except the pretraining head's
translation (1o) and rotation (1e) scores, which rotate with the input. (ATOMICA adds a 1o and
a 1e vector for each; keeping the polar and the axial vector apart here makes the parity right.)
"""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from molgen.atomica import graph as gr
from molgen.chem import complexes as cx

STAGES = ("32x0e", "16x1o+16x2e", "16x1e+16x2o", "32x0o")


def stage_irreps(layer: int, hidden: int = 32) -> e3nn.Irreps:
    """Irreps after `layer` convolutions (0: the input), with ATOMICA's growth (hidden 32)."""
    scale = hidden / 32
    parts = [e3nn.Irreps(s) for s in STAGES[: min(layer, 3) + 1]]
    return e3nn.Irreps([(max(1, int(mul * scale)), ir) for p in parts for mul, ir in p]).sort().irreps.simplify()


def pad_to(h: e3nn.IrrepsArray, irreps: e3nn.Irreps) -> e3nn.IrrepsArray:
    """`h` with zero chunks for the irreps it lacks (same multiplicities where present)."""
    have = {ir: (mul, c) for (mul, ir), c in zip(h.irreps, h.chunks, strict=True)}
    chunks = []
    for mul, ir in irreps:
        if ir in have and have[ir][1] is not None:
            if have[ir][0] != mul:
                raise ValueError(f"pad_to: {ir} has multiplicity {have[ir][0]}, wanted {mul}")
            chunks.append(have[ir][1])
        else:
            chunks.append(None)
    return e3nn.from_chunks(irreps, chunks, h.shape[:-1], h.dtype)


def segment_mean(x, seg, n, mask):
    m = mask.astype(x.dtype).reshape(mask.shape + (1,) * (x.ndim - 1))
    s = jax.ops.segment_sum(x * m, seg, n)
    c = jax.ops.segment_sum(mask.astype(x.dtype), seg, n)
    return s / jnp.maximum(c, 1.0).reshape((n,) + (1,) * (x.ndim - 1))


def safe_vec(v, eps: float = 1e-10):
    """(v, where |v| > 0) with zero vectors replaced by a unit vector, so norms and harmonics
    have finite gradients (multiply their results by the mask)."""
    ok = (v**2).sum(-1) > eps
    return jnp.where(ok[..., None], v, jnp.array([1.0, 0.0, 0.0], v.dtype)), ok


def gaussians(d, stop: float, n: int = 32):
    mu = jnp.linspace(0.0, stop, n)
    delta = stop / (n - 1)
    return jnp.exp(-0.5 * ((d[..., None] - mu) / delta) ** 2)


class MLP(nn.Module):
    """Dense layers with ReLU between them (none after the last)."""

    features: tuple

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def mlp(features, name=None) -> MLP:
    return MLP(tuple(features), name=name)


class EquivariantLayerNorm(nn.Module):
    """Equiformer-v2-style norm: scalars (0e) centred over channels; every irrep type scaled by
    the inverse root mean square of its channels' components, times a learned per-channel
    weight; a bias on 0e only."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, h: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        chunks = []
        for (mul, ir), c in zip(h.irreps, h.chunks, strict=True):
            if c is None:
                chunks.append(None)
                continue
            if ir == e3nn.Irrep("0e"):
                c = c - c.mean(axis=-2, keepdims=True)
            ms = (c**2).mean(axis=(-2, -1), keepdims=True)
            w = self.param(f"w_{ir}", nn.initializers.ones, (mul, 1))
            c = c * jax.lax.rsqrt(ms + self.eps) * w
            if ir == e3nn.Irrep("0e"):
                c = c + self.param("b_0e", nn.initializers.zeros, (mul, 1))
            chunks.append(c)
        return e3nn.from_chunks(h.irreps, chunks, h.shape[:-1], h.dtype)


class Conv(nn.Module):
    """One tensor-product convolution, mean-aggregated, with equivariant norm and residual."""

    irreps_out: e3nn.Irreps
    tp: str = "depthwise"
    cutoff: float = 5.0
    hidden: int = 32

    @nn.compact
    def __call__(self, h, pos, src, dst, etype, emask, dist=None):
        n = h.shape[0]
        vec, ok = safe_vec(pos[src] - pos[dst])
        d = jnp.linalg.norm(vec, axis=-1) * ok if dist is None else dist
        # a zero vector (a padding edge) has no direction: its harmonics are set to zero
        y = e3nn.spherical_harmonics("0e+1o+2e", vec, normalize=True, normalization="component") * ok[:, None]
        rbf = mlp((self.hidden, self.hidden), name="rbf")(gaussians(d, self.cutoff))
        temb = nn.Embed(4, self.hidden, name="edge_type")(etype)
        s = h.filter(keep="0e").array[:, : self.hidden]
        e = jnp.concatenate([rbf, temb, s[dst], s[src]], axis=-1)
        t = e3nn.tensor_product(h[src], y, filter_ir_out=self.irreps_out)
        if self.tp == "depthwise":
            w = mlp((4 * self.hidden, t.irreps.num_irreps), name="weights")(e)
            msg = e3nn.IrrepsArray(t.irreps, t.array * w[:, _chunk_index(t.irreps)])
        elif self.tp == "fully_connected":
            msg = _per_edge_linear(self, t, e, self.irreps_out)
        else:
            raise ValueError(f"model.tp must be 'depthwise' or 'fully_connected', got {self.tp!r}")
        agg = e3nn.IrrepsArray(msg.irreps, segment_mean(msg.array, dst, n, emask))
        if self.tp == "depthwise":
            agg = e3nn.flax.Linear(self.irreps_out, name="mix")(agg)
        agg = pad_to(agg.regroup(), self.irreps_out)
        out = EquivariantLayerNorm(name="norm")(agg)
        return pad_to(h, self.irreps_out) + out


def _chunk_index(irreps: e3nn.Irreps):
    """Index of the channel weight for every component of `irreps` (one weight per channel)."""
    import numpy as np

    idx, k = [], 0
    for mul, ir in irreps:
        idx += list(np.repeat(np.arange(k, k + mul), ir.dim))
        k += mul
    return np.asarray(idx, np.int32)


def _per_edge_linear(mod, t: e3nn.IrrepsArray, e, irreps_out: e3nn.Irreps):
    """Fully connected tensor product with per-edge weights: for each output irrep, a
    (channels in x channels out) matrix per edge from an MLP, over every path reaching it."""
    t = t.regroup()
    plan, numel = [], 0
    for mul_o, ir_o in irreps_out:
        mul_i = sum(mul for mul, ir in t.irreps if ir == ir_o)
        if mul_i:
            plan.append((mul_o, ir_o, mul_i, numel))
            numel += mul_i * mul_o
    w = mlp((4 * mod.hidden, numel), name="weights")(e)
    chunks = []
    by_ir = {ir: c for (mul, ir), c in zip(t.irreps, t.chunks, strict=True)}
    for mul_o, ir_o in irreps_out:
        step = next((p for p in plan if p[1] == ir_o), None)
        if step is None or by_ir.get(ir_o) is None:
            chunks.append(None)
            continue
        _, _, mul_i, off = step
        wm = w[:, off : off + mul_i * mul_o].reshape(-1, mul_i, mul_o)
        chunks.append(jnp.einsum("eid,eio->eod", by_ir[ir_o], wm) / jnp.sqrt(mul_i))
    return e3nn.from_chunks(irreps_out, chunks, (t.shape[0],), t.dtype)


class Stack(nn.Module):
    layers: int = 4
    hidden: int = 32
    tp: str = "depthwise"

    @nn.compact
    def __call__(self, h, pos, src, dst, etype, emask, dist=None):
        for i in range(self.layers):
            h = Conv(stage_irreps(i + 1, self.hidden), self.tp, hidden=self.hidden, name=f"conv_{i}")(
                h, pos, src, dst, etype, emask, dist
            )
        return h


def scalars(h: e3nn.IrrepsArray):
    return jnp.concatenate([h.filter(keep="0e").array, h.filter(keep="0o").array], axis=-1)


def l2norm(x, eps: float = 1e-8):
    return x / jnp.sqrt((x**2).sum(-1, keepdims=True) + eps)


SIZE_KEYS = ("hidden", "layers", "heads", "pool_layers", "tp")


class Sized(nn.Module):
    """The encoder's sizes, shared by the encoder and every model built on it."""

    hidden: int = 32
    layers: int = 4
    heads: int = 4
    pool_layers: int = 4
    tp: str = "depthwise"

    def encoder(self, name: str = "encoder") -> Encoder:
        return Encoder(**{k: getattr(self, k) for k in SIZE_KEYS}, name=name)


class Encoder(Sized):
    """Atom and block representations and the interface embedding of a collated batch."""

    @nn.compact
    def __call__(self, b: dict) -> dict:
        nb, ng = b["block_type"].shape[0], b["graph_mask"].shape[0]
        h0 = nn.Embed(cx.N_ATOM_TYPES, self.hidden, name="atom_embed")(b["element"])
        h = e3nn.IrrepsArray(f"{self.hidden}x0e", h0)
        ha = Stack(self.layers, self.hidden, self.tp, name="atom_stack")(
            h, b["x"], b["atom_src"], b["atom_dst"], b["atom_etype"], b["atom_edge_mask"]
        )
        atom_repr = l2norm(mlp((2 * self.hidden, self.hidden), name="atom_out")(scalars(ha)))
        # atoms -> blocks: the block-type embedding attends over its atoms
        q0 = nn.Embed(cx.n_block_types(), self.hidden, name="block_embed")(b["block_type"])
        pooled = _block_attention(self, q0, atom_repr, b["atom_block"], b["atom_mask"], nb)
        hb0 = nn.LayerNorm(name="block_in_norm")(q0 + pooled)
        hb = Stack(self.layers, self.hidden, self.tp, name="block_stack")(
            e3nn.IrrepsArray(f"{self.hidden}x0e", hb0), b["block_x"], b["block_src"], b["block_dst"],
            b["block_etype"], b["block_edge_mask"], b["block_edist"],
        )  # fmt: skip
        block_repr = l2norm(mlp((2 * self.hidden, self.hidden), name="block_out")(scalars(hb)))
        # interface embedding: self-attention among the blocks of each interface
        same = (b["block_graph"][:, None] == b["block_graph"][None]) & b["block_mask"][None] & b["block_mask"][:, None]
        z = block_repr
        for i in range(self.pool_layers):
            att = nn.MultiHeadDotProductAttention(self.heads, name=f"pool_attn_{i}")(
                z[None], mask=same[None, None]
            )[0]  # fmt: skip
            z = nn.LayerNorm(name=f"pool_norm_{i}")(z + att)
        g = jax.ops.segment_sum(z * b["block_mask"][:, None], b["block_graph"], ng)
        graph_repr = l2norm(nn.Dense(self.hidden, name="graph_out")(g))
        return {"atom_h": ha, "atom_repr": atom_repr, "block_h": hb, "block_repr": block_repr, "graph_repr": graph_repr}


def _block_attention(mod, q0, atom_repr, atom_block, atom_mask, nb):
    """Multi-head attention of each block (query: its type embedding) over its own atoms."""
    h, d = mod.heads, mod.hidden
    q = nn.DenseGeneral((h, d // h), name="pool_q")(q0)
    k = nn.DenseGeneral((h, d // h), name="pool_k")(atom_repr)
    v = nn.DenseGeneral((h, d // h), name="pool_v")(atom_repr)
    logit = (q[atom_block] * k).sum(-1) / jnp.sqrt(d // h)  # (atoms, heads)
    logit = jnp.where(atom_mask[:, None], logit, -1e9)
    mx = jax.ops.segment_max(logit, atom_block, nb)
    p = jnp.exp(logit - mx[atom_block]) * atom_mask[:, None]
    den = jax.ops.segment_sum(p, atom_block, nb)
    out = jax.ops.segment_sum(p[..., None] * v, atom_block, nb) / jnp.maximum(den, 1e-9)[..., None]
    return nn.DenseGeneral(d, axis=(-2, -1), name="pool_o")(out)


class Pretrainer(Sized):
    """The encoder with ATOMICA's pretraining heads: translation (1o) and rotation (1e) scores of
    the noised segment, the torsion score of each noised rotatable bond, and the type of each
    masked block (logits over the block vocabulary). `rigid_head`: how contacts across the
    interface add to the translation and rotation scores: "forces" (learned pair forces, summed
    and turned into a torque) or "lsq" (a least-squares rigid fit to learned contact misfits)."""

    rigid_head: str = "forces"

    @nn.compact
    def __call__(self, b: dict) -> dict:
        enc = self.encoder()(b)
        ha, ng = enc["atom_h"], b["graph_mask"].shape[0]
        h0 = ha.filter(keep="0e").array[:, : self.hidden]
        # translation and rotation: a convolution from the noised atoms to their centre
        noised = b["atom_noised"] & b["atom_mask"]
        centre = segment_mean(b["x"], b["atom_graph"], ng, noised)
        vec, ok = safe_vec(b["x"] - centre[b["atom_graph"]])
        y = e3nn.spherical_harmonics("0e+1o+2e", vec, normalize=True, normalization="component") * ok[:, None]
        d = jnp.linalg.norm(vec, axis=-1) * ok
        e = jnp.concatenate([mlp((self.hidden, self.hidden), name="tr_rbf")(gaussians(d, 20.0)), h0], axis=-1)
        t = e3nn.tensor_product(ha, y, filter_ir_out="1o+1e")
        w = mlp((2 * self.hidden, t.irreps.num_irreps), name="tr_weights")(e)
        msg = t.array * w[:, _chunk_index(t.irreps)]
        agg = e3nn.IrrepsArray(t.irreps, segment_mean(msg, b["atom_graph"], ng, noised))
        vecs = e3nn.flax.Linear("1x1o+1x1e", name="tr_rot_out")(agg)
        scale_tr = mlp((self.hidden, self.hidden, 1), name="tr_scale")(enc["graph_repr"])
        scale_rot = mlp((self.hidden, self.hidden, 1), name="rot_scale")(enc["graph_repr"])
        rigid = {"forces": _contact_forces, "lsq": _rigid_fit}[self.rigid_head]
        ftr, frot = rigid(self, b, ha.filter(keep="0e").array[:, : self.hidden], centre, noised)
        out = {"trans": vecs.filter(keep="1o").array * scale_tr + ftr,
               "rot": vecs.filter(keep="1e").array * scale_rot + frot}  # fmt: skip
        # torsions: the atoms around each bond's midpoint
        if "tor_u" in b:
            u, v, nbr, nmask = b["tor_u"], b["tor_v"], b["tor_nbr"], b["tor_nbr_mask"]
            mid = (b["x"][u] + b["x"][v]) / 2
            rel, okn = safe_vec(b["x"][nbr] - mid[:, None])
            okn = okn & nmask
            bond, okb = safe_vec(b["x"][v] - b["x"][u])
            ysh = e3nn.spherical_harmonics("0e+1o+2e", rel, normalize=True, normalization="component")
            ybond = e3nn.spherical_harmonics("2e", bond, normalize=True, normalization="component")
            yy = e3nn.tensor_product(ysh, ybond[:, None]) * (okn & okb[:, None])[..., None]
            dn = jnp.linalg.norm(rel, axis=-1) * okn
            en = jnp.concatenate([mlp((self.hidden, self.hidden), name="tor_rbf")(gaussians(dn, 5.0)), h0[nbr],
                                  jnp.broadcast_to((h0[u] + h0[v])[:, None], h0[nbr].shape)], axis=-1)  # fmt: skip
            tt = e3nn.tensor_product(ha[nbr], yy, filter_ir_out="0e+0o")
            wt = mlp((3 * self.hidden, tt.irreps.num_irreps), name="tor_weights")(en)
            m = tt.array * wt[..., _chunk_index(tt.irreps)] * okn[..., None]
            pooled = m.sum(1) / jnp.maximum(okn.sum(1, keepdims=True), 1)
            z = jnp.tanh(
                nn.Dense(self.hidden, use_bias=False, name="tor_hidden")(nn.LayerNorm(name="tor_norm")(pooled))
            )
            out["tor"] = nn.Dense(1, use_bias=False, name="tor_out")(z)[:, 0]
        feats = jnp.concatenate([scalars(enc["block_h"]), enc["block_repr"]], axis=-1)
        logits = mlp((2 * self.hidden, self.hidden, cx.n_block_types()), name="mask_head")(feats)
        out["mask_logits"] = logits
        out.update(enc)
        return out


def _contact_edges(mod, b, s, noised, cutoff: float):
    """The atom-level edges between a noised and a partner atom within `cutoff`, each with
    phi(distance, both atoms' scalars) (2 outputs; the last layer starts at zero): (phi [E, 2],
    unit vector partner -> noised [E, 3], interface of each edge [E], envelope x valid [E],
    noised end [E])."""
    src, dst = b["atom_src"], b["atom_dst"]
    cross = (b["atom_etype"] == gr.INTER) & b["atom_edge_mask"] & (noised[dst] != noised[src])
    n_at = jnp.where(noised[dst], dst, src)  # the noised end of each edge
    p_at = jnp.where(noised[dst], src, dst)
    u, ok = safe_vec(b["x"][n_at] - b["x"][p_at])
    d = jnp.linalg.norm(u, axis=-1)
    ok = ok & cross & (d < cutoff)
    env = 0.5 * (jnp.cos(jnp.pi * jnp.minimum(d, cutoff) / cutoff) + 1.0)
    e = jnp.concatenate([gaussians(d, cutoff), s[n_at], s[p_at]], axis=-1)
    hid = nn.silu(nn.Dense(2 * mod.hidden, name="force_0")(e))
    phi = nn.Dense(2, kernel_init=nn.initializers.zeros, name="force_out")(hid)
    return phi, u / jnp.maximum(d, 1e-6)[:, None], b["atom_graph"][n_at], env * ok, n_at


def _contact_forces(mod, b, s, centre, noised, cutoff: float = 8.0):
    """Rigid-body scores of the noised segment from learned pair forces across the interface:
    every contact edge (`_contact_edges`) carries a force phi * envelope along the partner ->
    noised direction; the translation score is their sum per interface, the rotation score (1e)
    their torque about the noised segment's centre (its own output of phi: the two scores
    differ in scale)."""
    phi, unit, g, env, n_at = _contact_edges(mod, b, s, noised, cutoff)
    ng = b["graph_mask"].shape[0]
    f = phi * env[:, None]
    r = b["x"][n_at] - centre[g]
    trans = jax.ops.segment_sum(f[:, :1] * unit, g, ng)
    rot = jax.ops.segment_sum(f[:, 1:] * jnp.cross(r, unit), g, ng)
    return trans, rot


def _rigid_fit(mod, b, s, centre, noised, cutoff: float = 8.0):
    """`model.rigid_head="lsq"`: rigid-body scores of the noised segment from a least-squares
    rigid fit to learned contact misfits. Every contact edge (`_contact_edges`) predicts how far
    its noised atom sits off its place along the partner -> noised direction n: m = phi_0, with
    weight w = softplus(phi_1 + 1) * envelope. A rigid displacement (v, omega) moves that atom
    by v + omega x r (r from the noised segment's centre, in units of its radius of gyration),
    n . v + (r x n) . omega along n; (v, omega) minimise sum w (m - n . v - (r x n) . omega)^2
    (+ a small ridge), a 6 x 6 solve per interface (point-to-plane ICP). Fitting both at once
    lets the tilt of the contact patch explain the shift a rotation causes there, so it is not
    read as translation, and the result is in Å whatever the number of contacts. Scores: learned
    gains times v (1o) and omega (1e)."""
    phi, unit, g, env, n_at = _contact_edges(mod, b, s, noised, cutoff)
    ng = b["graph_mask"].shape[0]
    m, w = phi[:, 0], jax.nn.softplus(phi[:, 1] + 1.0) * env
    rel = b["x"] - centre[b["atom_graph"]]
    rg2 = segment_mean(jnp.sum(rel**2, -1, keepdims=True), b["atom_graph"], ng, noised)[:, 0]
    r = (b["x"][n_at] - centre[g]) / jnp.sqrt(rg2 + 1.0)[g, None]
    a = jnp.concatenate([unit, jnp.cross(r, unit)], axis=-1)  # [E, 6]
    big_a = jax.ops.segment_sum(w[:, None, None] * a[:, :, None] * a[:, None, :], g, ng)
    ridge = 1e-3 * jnp.trace(big_a, axis1=1, axis2=2) / 6 + 1e-4
    rhs = jax.ops.segment_sum((w * m)[:, None] * a, g, ng)
    sol = jnp.linalg.solve(big_a + ridge[:, None, None] * jnp.eye(6), rhs[..., None])[..., 0]
    gains = mod.param("rigid_gains", lambda _: jnp.ones(2))
    return gains[0] * sol[:, :3], gains[1] * sol[:, 3:]
