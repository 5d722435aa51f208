"""Batched sampling with a KV cache, in one jitted loop (prefill + `lax.while_loop` decode).

Prompts of different lengths are right-padded; row b's prompt fills cache slots
0..len_b-1 and its generated tokens follow at len_b, len_b+1, ... (slot == position), so
the padding slots are overwritten before any query can see them. A row stops at
`stop_id` ([/CONFORMER]); the loop ends when every row has stopped or after `max_new`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from molgen.lm import tokenizer
from molgen.lm.model import Qwen3, Qwen3Config, cache_mask, init_cache


def filter_logits(logits_BxV, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    logits = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each entry
        cutoff = jnp.min(jnp.where(cum < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature", "top_k", "top_p", "greedy", "stop_id"))
def generate(
    params,
    prompt_BxP,
    prompt_len_B,
    rng,
    *,
    cfg: Qwen3Config,
    max_new: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_id: int = tokenizer.CONF_END_ID,
):
    """New tokens [B, max_new] (PAD after a row stops) and the number generated per row."""
    model = Qwen3(cfg)
    b, p = prompt_BxP.shape
    length = p + max_new
    cache = init_cache(cfg, b, length)
    pos = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, cache = model.apply({"params": params}, prompt_BxP, pos, cache_mask(pos, length), cache)
    last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]  # [B, V]

    def pick(logits_BxV, key):
        if greedy:
            return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits_BxV, temperature, top_k, top_p)).astype(jnp.int32)

    out = jnp.full((b, max_new), tokenizer.PAD_ID, jnp.int32)
    done = jnp.zeros((b,), bool)
    n_gen = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, cache, last, out, done, n_gen, rng = carry
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, tokenizer.PAD_ID, pick(last, key))
        out = out.at[:, i].set(tok)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | (tok == stop_id)
        pos = (prompt_len_B + i)[:, None]
        logits, cache = model.apply({"params": params}, tok[:, None], pos, cache_mask(pos, length), cache)
        return i + 1, cache, logits[:, 0], out, done, n_gen, rng

    carry = (jnp.int32(0), cache, last, out, done, n_gen, rng)
    _, _, _, out, _, n_gen, _ = jax.lax.while_loop(cond, body, carry)
    return out, n_gen


def pad_prompts(prompts: list[np.ndarray], multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id prompts to a common length (rounded up, to limit recompilation)."""
    lens = np.asarray([len(x) for x in prompts], np.int32)
    p = int(-(-lens.max() // multiple) * multiple)
    arr = np.full((len(prompts), p), tokenizer.PAD_ID, np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return arr, lens


def sample_texts(
    params,
    cfg: Qwen3Config,
    prompts: list[str],
    rng,
    *,
    max_new: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> list[str]:
    """Prompt + completion text for every prompt, generated in batches of `batch_size`."""
    ids = [tokenizer.encode(p) for p in prompts]
    texts = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compilation
        arr, lens = pad_prompts(chunk)
        rng, key = jax.random.split(rng)
        out, _ = generate(
            params,
            jnp.asarray(arr),
            jnp.asarray(lens),
            key,
            cfg=cfg,
            max_new=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
        )
        out = np.asarray(out)
        for i in range(n):
            texts.append(prompts[start + i] + tokenizer.decode(out[i]))
    return texts
