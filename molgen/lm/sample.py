"""Batched sampling with a KV cache, in one jitted loop (prefill + `lax.while_loop` decode).

Prompts of different lengths are right-padded to P; row b's prompt fills cache slots
0..len_b-1 and generated token i of every row goes to slot P+i, one in-place
dynamic_update_slice per step. The padding slots len_b..P-1 stay masked; RoPE positions
are tracked separately (len_b+i, or the aligned positions). A row stops at
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


STATIC = ("cfg", "max_new", "temperature", "top_k", "top_p", "greedy", "stop_id", "pos_mode", "window", "grammar")


@functools.partial(jax.jit, static_argnames=STATIC)
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
    prompt_pos_BxP=None,
    pos_state=None,
    pos_mode: str = "sequential",
    window: int = 64,
    grammar: bool = False,
    grammar_state_B=None,
):
    """New tokens [B, max_new] (PAD after a row stops) and the number generated per row.

    prompt_pos_BxP / pos_state: RoPE positions of the prompts and the position state after
    them (`prepare_prompts`); by default sequential positions.
    grammar: constrained decoding; tokens that would break a coordinate block `<x,y,z>`
    (tokenizer.grammar_mask) get probability 0 and the rest are renormalised. The prompts end
    outside a block (a conformer prompt ends with [CONFORMER]) unless `grammar_state_B` gives
    the automaton state after each prompt (tokenizer.grammar_violation).
    """
    model = Qwen3(cfg)
    b, p = prompt_BxP.shape
    cache = init_cache(cfg, b, p)
    slots = jnp.broadcast_to(jnp.arange(p), (b, p))
    pos = slots.astype(jnp.float32) if prompt_pos_BxP is None else prompt_pos_BxP
    if pos_state is None:
        pos_state = (jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    logits, cache = model.apply({"params": params}, prompt_BxP, pos, cache_mask(slots, p), cache, 0)
    last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    last_pos = jnp.take_along_axis(pos, (prompt_len_B - 1)[:, None], axis=1)[:, 0]  # [B]

    def pick(logits_BxV, key, gstate):
        if grammar:
            logits_BxV = jnp.where(tokenizer.grammar_mask(gstate), logits_BxV, -jnp.inf)
        if greedy:
            return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits_BxV, temperature, top_k, top_p)).astype(jnp.int32)

    out = jnp.full((b, max_new), tokenizer.PAD_ID, jnp.int32)
    done = jnp.zeros((b,), bool)
    n_gen = jnp.zeros((b,), jnp.int32)

    def body(carry, attend_len):
        i, cache, last, out, done, n_gen, rng, last_pos, state, gstate = carry
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, tokenizer.PAD_ID, pick(last, key, gstate))
        gstate = tokenizer.grammar_next(gstate, tok) if grammar else gstate
        out = out.at[:, i].set(tok)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | (tok == stop_id)
        new_pos, *state = tokenizer.next_position(last_pos, *state, tok, pos_mode)
        slot = p + i  # generated tokens of every row go to slot p+i; prompt padding slots stay masked
        kv_slots = jnp.arange(attend_len)[None, :]
        mask = (kv_slots < prompt_len_B[:, None]) | ((kv_slots >= p) & (kv_slots <= slot))
        logits, cache = model.apply({"params": params}, tok[:, None], new_pos[:, None], mask[:, None, :], cache, slot)
        return i + 1, cache, logits[:, 0], out, done, n_gen, rng, new_pos, tuple(state), gstate

    # Decode in windows: the cache grows by `window` slots before each window of tokens, so a step
    # attends over at most window-1 empty slots instead of the whole unfilled tail.
    gstate = jnp.zeros((b,), jnp.int32) if grammar_state_B is None else jnp.asarray(grammar_state_B, jnp.int32)
    carry = (jnp.int32(0), cache, last, out, done, n_gen, rng, last_pos, tuple(pos_state), gstate)
    for start in range(0, max_new, window):
        end = min(start + window, max_new)
        n = end - start
        grow = [
            {"k": jnp.pad(c["k"], ((0, 0),) * 3 + ((0, n),)), "v": jnp.pad(c["v"], ((0, 0), (0, 0), (0, n), (0, 0)))}
            for c in carry[1]
        ]
        carry = (carry[0], grow, *carry[2:])
        cond = lambda c, end=end: (c[0] < end) & ~jnp.all(c[4])  # noqa: E731
        carry = jax.lax.while_loop(cond, functools.partial(body, attend_len=p + end), carry)
    return carry[3], carry[5]


def prepare_prompts(prompts: list[np.ndarray], pos_mode: str = "sequential", multiple: int = 16):
    """Right-padded token ids [B, P] (P rounded up to limit recompilation), lengths, positions
    and the position state after each prompt, as `generate` takes them."""
    lens = np.asarray([len(x) for x in prompts], np.int32)
    p = int(-(-lens.max() // multiple) * multiple)
    arr = np.full((len(prompts), p), tokenizer.PAD_ID, np.int32)
    pos = np.zeros((len(prompts), p), np.float32)
    state = np.zeros((3, len(prompts)), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
        pos[i, : len(x)], st = tokenizer.positions_and_state(x, pos_mode)
        state[:, i] = st
    return arr, lens, pos, (state[0].astype(bool), state[1], state[2])


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
    pos_mode: str = "sequential",
    grammar: bool = False,
    on_batch=None,
) -> list[str]:
    """Prompt + completion text for every prompt, generated in batches of `batch_size`;
    `on_batch(done, total)` is called after each batch (progress reporting)."""
    ids = [tokenizer.encode(p) for p in prompts]
    texts = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compilation
        arr, lens, pos, state = prepare_prompts(chunk, pos_mode)
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
            prompt_pos_BxP=jnp.asarray(pos),
            pos_state=tuple(jnp.asarray(x) for x in state),
            pos_mode=pos_mode,
            grammar=grammar,
        )
        out = np.asarray(out)
        for i in range(n):
            texts.append(prompts[start + i] + tokenizer.decode(out[i]))
        if on_batch is not None:
            on_batch(len(texts), len(ids))
    return texts
