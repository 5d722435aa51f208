"""Qwen3 decoder in Flax linen (REFERENCE.md section 1).

Pre-norm RMSNorm (fp32), QK-norm per head before RoPE (theta 1e6, rotate-half), GQA,
SwiGLU, no biases, tied embeddings. The same module trains on packed sequences and
decodes with a KV cache. Callers pass either segment ids [B, T] (training on packed rows:
causal attention within each segment, computed by `causal_attend` block by block with a
flash-attention backward, so no [T, T] mask or probability matrix is ever stored), or an
explicit boolean mask [B, T, S] (any pattern: `packed_mask`, or `cache_mask` for decoding).
With a cache the new keys and values are written at the slots given by `positions`
(slot == position).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Qwen3Config":
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


_init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions_BxT, d: int, theta: float):
    """cos and sin [B, T, 1, D] of the rotary angles (rotate-half: dims i and i + D/2 share one)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half_matrix(d: int):
    """R with x @ R = concat(-x2, x1): a signed permutation, so the product is exact. XLA:CPU runs
    this tiny matmul (and its transpose in the backward) faster than a minor-axis concatenate."""
    h = np.arange(d // 2)
    r = np.zeros((d, d), np.float32)
    r[h + d // 2, h], r[h, h + d // 2] = -1.0, 1.0
    return r


def rope(x_BxTxHxD, tables):
    """Rotary embedding (rotate-half, as Qwen3/transformers) in float32, with the (cos, sin) of
    `rope_tables` for these positions."""
    cos, sin = tables
    x = x_BxTxHxD.astype(jnp.float32)
    rotated = jnp.dot(x, _rotate_half_matrix(x.shape[-1]), precision=jax.lax.Precision.HIGHEST)
    return (x * cos + rotated * sin).astype(x_BxTxHxD.dtype)


def packed_mask(segment_ids_BxT, q0: int = 0, n_queries: int | None = None):
    """Causal attention within each packed segment; segment 0 is padding. [B, Q, S]: the rows of
    queries q0..q0+Q-1 (default all) against keys 0..q0+Q-1, the keys a causal query can see."""
    s = segment_ids_BxT.shape[1] if n_queries is None else q0 + n_queries
    seg_q, seg_k = segment_ids_BxT[:, q0:s], segment_ids_BxT[:, :s]
    causal = jnp.arange(q0, s)[:, None] >= jnp.arange(s)[None, :]
    return causal[None] & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)


def cache_mask(slots_BxT, cache_len: int):
    """A query written at cache slot s sees slots 0..s."""
    return jnp.arange(cache_len)[None, None, :] <= slots_BxT[:, :, None]


def init_cache(cfg: Qwen3Config, batch: int, length: int, dtype=None):
    """Per layer: keys [B, K, D, S] and values [B, K, S, D] (see `attend`)."""
    dtype = dtype or DTYPES[cfg.dtype]
    kv, d = cfg.n_kv_heads, cfg.head_dim
    return [
        {"k": jnp.zeros((batch, kv, d, length), dtype), "v": jnp.zeros((batch, kv, length, d), dtype)}
        for _ in range(cfg.n_layers)
    ]


NEG = float(jnp.finfo(jnp.float32).min)  # score of a masked key


def attend(q_BxTxHxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS, dtype):
    """Grouped-query softmax attention, [B, T, H, D].

    Keys are stored [B, K, D, S] and values [B, K, S, D]: both matmuls are then plain batched
    [G*T, D] x [D, S] and [G*T, S] x [S, D] products with no transposed copy of the cache, and for a
    single query (decoding) both become multiply-reduce fusions over a non-minor axis, which stream
    the cache once with the contiguous axis vectorised (XLA:CPU runs these 2-3x faster than a batch
    of tiny matmuls)."""
    b, t, h, d = q_BxTxHxD.shape
    kv, s = k_BxKxDxS.shape[1], k_BxKxDxS.shape[3]
    g = h // kv
    k, v = k_BxKxDxS.astype(q_BxTxHxD.dtype), v_BxKxSxD.astype(dtype)
    q = q_BxTxHxD.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    if t == 1:
        scores = jnp.sum(q[..., None] * k[:, :, None], axis=3, dtype=jnp.float32)
    else:
        scores = jnp.einsum("bkqd,bkds->bkqs", q, k).astype(jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) * (d**-0.5)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kv, g * t, s)
    if t == 1:
        out = jnp.sum(probs[..., None] * v[:, :, None], axis=3)
    else:
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


ATTN_BLOCK = 128  # query rows per block of `causal_attend`


def _block_scores(q_blk, k, seg_BxT, q0: int, scale: float):
    """Masked scores [B, K, Bq, G, S] of the query block starting at q0 against keys 0..S-1,
    S = q0 + Bq (the keys a causal block can see), and the mask."""
    bq = q_blk.shape[2]
    scores = jnp.einsum("bkqgd,bksd->bkqgs", q_blk, k[:, :, : q0 + bq]).astype(jnp.float32) * scale
    mask = packed_mask(seg_BxT, q0, bq)[:, None, :, None]
    return jnp.where(mask, scores, NEG), mask


def _causal_fwd(q, k, v, seg, block):
    """Output [B, K, T, G, D] and per-row softmax statistics [B, K, T, G, 2] (max, 1/sum)."""
    scale = q.shape[-1] ** -0.5
    outs, stats = [], []
    for q0 in range(0, q.shape[2], block):
        s, _ = _block_scores(q[:, :, q0 : q0 + block], k, seg, q0, scale)
        m = jnp.max(s, -1, keepdims=True)
        p = jnp.exp(s - m)
        inv = 1.0 / jnp.sum(p, -1, keepdims=True)
        outs.append(jnp.einsum("bkqgs,bksd->bkqgd", (p * inv).astype(v.dtype), v[:, :, : q0 + block]))
        stats.append(jnp.concatenate([m, inv], -1))
    return jnp.concatenate(outs, 2), jnp.concatenate(stats, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal(q, k, v, seg, block):
    return _causal_fwd(q, k, v, seg, block)[0]


def _causal_vjp_fwd(q, k, v, seg, block):
    o, stats = _causal_fwd(q, k, v, seg, block)
    return o, (q, k, v, seg, o, stats)


def _causal_vjp_bwd(block, res, do):
    """Flash-attention backward: probabilities recomputed per block from the saved statistics,
    rowsum(dP * P) taken as rowsum(dO * O)."""
    q, k, v, seg, o, stats = res
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)[..., None]  # [B, K, T, G, 1]
    b, kv, t, d = k.shape
    dq, dk, dv = [], jnp.zeros((b, kv, d, t), jnp.float32), jnp.zeros((b, kv, d, t), jnp.float32)  # transposed
    for q0 in range(0, q.shape[2], block):
        e = q0 + block
        s, mask = _block_scores(q[:, :, q0:e], k, seg, q0, scale)
        p = jnp.exp(s - stats[:, :, q0:e, :, :1]) * stats[:, :, q0:e, :, 1:]
        do_b = do[:, :, q0:e]
        dv = dv.at[:, :, :, :e].add(jnp.einsum("bkqgd,bkqgs->bkds", do_b, p.astype(do.dtype)).astype(jnp.float32))
        dp = jnp.einsum("bkqgd,bksd->bkqgs", do_b, v[:, :, :e]).astype(jnp.float32)
        # masked scores carry no gradient (rows with no visible key attend uniformly, as a softmax would)
        ds = jnp.where(mask, p * (dp - delta[:, :, q0:e]) * scale, 0.0).astype(q.dtype)
        dq.append(jnp.einsum("bkqgs,bksd->bkqgd", ds, k[:, :, :e]))
        dk = dk.at[:, :, :, :e].add(jnp.einsum("bkqgd,bkqgs->bkds", q[:, :, q0:e], ds).astype(jnp.float32))
    dk, dv = dk.transpose(0, 1, 3, 2).astype(k.dtype), dv.transpose(0, 1, 3, 2).astype(v.dtype)
    return jnp.concatenate(dq, 2), dk, dv, None


_causal.defvjp(_causal_vjp_fwd, _causal_vjp_bwd)


def causal_attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, block: int | None = None):
    """Grouped-query attention, causal within packed segments (0 = padding), [B, T, H, D].

    Equal to `attend` under `packed_mask(segment_ids)`, but computed per block of `block` query
    rows against only the keys at or before the block (the blocks above the diagonal are
    skipped: 5/8 of the work at T = 4 blocks), with a custom VJP that recomputes the
    probabilities instead of storing [T, T] of them."""
    b, t, h, d = q_BxTxHxD.shape
    kv = k_BxTxKxD.shape[2]
    block = block or ATTN_BLOCK
    block = block if t % block == 0 else t
    q = q_BxTxHxD.reshape(b, t, kv, h // kv, d).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, D]
    k, v = k_BxTxKxD.transpose(0, 2, 1, 3), v_BxTxKxD.transpose(0, 2, 1, 3)  # [B, K, T, D]
    out = _causal(q, k, v, segment_ids_BxT.astype(jnp.int32), block)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


@jax.custom_vjp
def linear(x, w):
    """x [..., K] @ w [K, N]; the backward picks which operand of dW to transpose.

    XLA:CPU lays dW = x^T dy out by making the producer of dy write it transposed, a strided
    [tokens, N] copy that costs as much as the matmul for d_ff-wide layers. Here the smaller of x
    and dy is transposed explicitly (the barrier keeps XLA from folding it back into the dot)."""
    return jnp.dot(x, w)


def _linear_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _linear_bwd(res, dy):
    x, w = res
    k, n = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    if k <= n:
        dw = jnp.dot(jax.lax.optimization_barrier(x2.T), dy2)
    else:
        dw = jnp.dot(jax.lax.optimization_barrier(dy2.T), x2).T
    return dx, dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Kernel(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self):
        return self.param("kernel", _init, self.shape, jnp.float32)


class Attention(nn.Module):
    cfg: Qwen3Config

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, slots_BxT=None, tables=None):
        c, dtype = self.cfg, DTYPES[self.cfg.dtype]
        b, t, _ = x_BxTxD.shape
        d, nq, nk = x_BxTxD.shape[-1], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        w = [Kernel((d, n), name=name)() for n, name in ((nq, "q_proj"), (nk, "k_proj"), (nk, "v_proj"))]
        o_proj = Kernel((nq, d), name="o_proj")().astype(dtype)
        qkv = linear(x_BxTxD.astype(dtype), jnp.concatenate(w, axis=1).astype(dtype))  # one matmul, not three
        q = qkv[..., :nq].reshape(b, t, c.n_heads, c.head_dim)
        k = qkv[..., nq : nq + nk].reshape(b, t, c.n_kv_heads, c.head_dim)
        v = qkv[..., nq + nk :].reshape(b, t, c.n_kv_heads, c.head_dim)
        tables = tables or rope_tables(positions_BxT, c.head_dim, c.rope_theta)
        q = rope(RMSNorm(c.norm_eps, name="q_norm")(q), tables)
        k = rope(RMSNorm(c.norm_eps, name="k_norm")(k), tables)
        if mask_BxTxS.ndim == 2:  # segment ids: training on packed rows
            if cache is not None:
                raise ValueError("decoding with a KV cache needs an explicit [B, T, S] mask, not segment ids")
            out = causal_attend(q, k, v, mask_BxTxS)
            return linear(out.reshape(b, t, nq), o_proj), None
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, D, T] and [B, K, T, D]
        if cache is not None:  # write at the given slots (default: slot == position), attend over the cache
            slots = positions_BxT.astype(jnp.int32) if slots_BxT is None else slots_BxT
            ck, cv = cache["k"], cache["v"]
            if jnp.ndim(slots) == 0:  # every row writes at the same slot: an in-place dynamic_update_slice
                k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), slots, axis=3)
                v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), slots, axis=2)
            else:
                rows, heads, at = jnp.arange(b)[:, None, None], jnp.arange(c.n_kv_heads)[:, None], slots[:, None, :]
                k = ck.at[rows, heads, :, at].set(k.transpose(0, 1, 3, 2).astype(ck.dtype))
                v = cv.at[rows, heads, at].set(v.astype(cv.dtype))
            cache = {"k": k, "v": v}
        out = attend(q, k, v, mask_BxTxS, dtype).reshape(b, t, nq)
        return linear(out, o_proj), cache


class MLP(nn.Module):
    cfg: Qwen3Config

    @nn.compact
    def __call__(self, x):
        dtype = DTYPES[self.cfg.dtype]
        d, f = x.shape[-1], self.cfg.d_ff
        x = x.astype(dtype)
        # two matmuls, not one over concatenated weights: the backward then needs no concatenated
        # [tokens, 2F] gradient (measured 2-4% of the step on CPU)
        gate = linear(x, Kernel((d, f), name="gate_proj")().astype(dtype))
        h = nn.silu(gate) * linear(x, Kernel((d, f), name="up_proj")().astype(dtype))
        return linear(h, Kernel((f, d), name="down_proj")().astype(dtype))


class Block(nn.Module):
    cfg: Qwen3Config

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, slots=None, tables=None):
        x_norm = RMSNorm(self.cfg.norm_eps, name="input_norm")(x)
        h, cache = Attention(self.cfg, name="attn")(x_norm, positions, mask, cache, slots, tables)
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg.norm_eps, name="post_attn_norm")(x))
        return x, cache


class Qwen3(nn.Module):
    cfg: Qwen3Config

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, mask_BxTxS, cache=None, slots_BxT=None):
        """Logits [B, T, V] (float32) and the updated cache (None without one).

        mask_BxTxS: segment ids [B, T] (causal within segments, 0 = padding; no cache) or a
        boolean mask [B, T, S]. positions: RoPE positions (int or float); slots: cache slots to
        write, [B, T] ints (default: the positions) or one scalar start slot shared by all rows
        (fast path)."""
        c, dtype = self.cfg, DTYPES[self.cfg.dtype]
        embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=_init, name="embed")
        x = embed(tokens_BxT).astype(dtype)
        block = nn.remat(Block, static_argnums=()) if c.remat else Block
        new_cache = []
        tables = rope_tables(positions_BxT, c.head_dim, c.rope_theta)  # once, not per layer
        for i in range(c.n_layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block(c, name=f"layers_{i}")(x, positions_BxT, mask_BxTxS, layer_cache, slots_BxT, tables)
            new_cache.append(layer_cache)
        x = RMSNorm(c.norm_eps, name="final_norm")(x)
        logits = linear(x.astype(dtype), embed.embedding.T.astype(dtype)).astype(jnp.float32)  # tied
        return logits, (new_cache if cache is not None else None)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 6N matmul FLOPs plus attention)."""
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
    matmul = cfg.n_layers * per_layer + cfg.vocab_size * d
    attn = cfg.n_layers * 2 * seq_len * h * hd  # QK^T and PV, causal average ~ seq_len/2 each, x2 flops
    return 6.0 * matmul + 3.0 * attn
