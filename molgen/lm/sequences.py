"""Prompt + completion rows for post-training (SFT, GRPO, DPO) and their token log-probs.

One example per row: `[prompt tokens][completion tokens][pad ...]`, with RoPE positions,
segment ids (1 on real tokens, 0 on padding) and a target mask that is 1 where a completion
token is predicted. Two codecs:

- "molecular": molgen's chemistry-aware tokenizer (`molgen.lm.tokenizer`) with the model's
  position mode ("aligned" couples the conformer to the prompt SMILES); a completion ends
  with `[/CONFORMER]`, the sampler's stop token.
- "bytes": a byte-level tokenizer for any text (Anthropic-HH dialogues, generic preference
  JSONL): id = byte + 2, with 0 padding and 1 end-of-text (appended to every completion and
  used as the stop token). Sequential positions. A model for it needs `vocab_size >= 258`
  (`BYTE_VOCAB`, padded to 384).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from molgen.lm import tokenizer
from molgen.lm.model import Qwen3

BYTE_OFFSET = 2
BYTE_VOCAB = 384  # 256 bytes + pad + eot, padded to a multiple of 128
CODECS = ("molecular", "bytes")


def byte_encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET


def byte_decode(ids) -> str:
    ids = np.asarray(ids)
    ids = ids[(ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + 256)] - BYTE_OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"data.codec={codec!r} is not one of {CODECS}")
    return codec


def encode_text(text: str, codec: str) -> np.ndarray:
    return tokenizer.encode(text) if check_codec(codec) == "molecular" else byte_encode(text)


def decode_ids(ids, codec: str) -> str:
    return tokenizer.decode(ids) if check_codec(codec) == "molecular" else byte_decode(ids)


def stop_id(codec: str) -> int:
    return tokenizer.CONF_END_ID if check_codec(codec) == "molecular" else tokenizer.EOT_ID


def completion_ids(text: str, codec: str) -> np.ndarray:
    ids = encode_text(text, codec)
    return ids if codec == "molecular" else np.concatenate([ids, [tokenizer.EOT_ID]]).astype(np.int32)


def make_row(prompt_ids, completion, max_len: int, pos_mode: str = "sequential") -> dict:
    """Fixed-length row of one prompt + completion (token ids). Raises ValueError when the
    prompt alone does not fit; a long completion is cut at `max_len` (`truncated` = 1)."""
    prompt_ids, completion = np.asarray(prompt_ids, np.int32), np.asarray(completion, np.int32)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit data.max_len={max_len}")
    ids = np.concatenate([prompt_ids, completion])[:max_len]
    n, p = len(ids), len(prompt_ids)
    tokens = np.zeros(max_len, np.int32)
    tokens[:n] = ids
    pos = np.zeros(max_len, np.float32)
    pos[:n] = tokenizer.positions(ids, pos_mode)
    seg = np.zeros(max_len, np.int32)
    seg[:n] = 1
    target = np.zeros(max_len, np.float32)
    target[p:n] = 1.0
    return {
        "tokens": tokens,
        "positions": pos,
        "segment_ids": seg,
        "target_mask": target,
        "truncated": np.int32(len(prompt_ids) + len(completion) > max_len),
    }


def token_logps(model: Qwen3, params, tokens_BxL, positions_BxL, segment_BxL):
    """log p(token t | tokens < t) for t = 1..L-1, [B, L-1] (float32)."""
    logits, _ = model.apply({"params": params}, tokens_BxL, positions_BxL, segment_BxL)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # slice after the gather, not the logits
    return jnp.take_along_axis(logp, jnp.roll(tokens_BxL, -1, axis=1)[..., None], axis=-1)[:, :-1, 0]


def completion_logps(model: Qwen3, params, batch, prefix: str = ""):
    """(per-token log-probs [B, L-1], mask [B, L-1]) of the completion tokens of a batch of rows
    (keys `prefix + tokens`, ...)."""
    tok, pos, seg = (batch[prefix + k] for k in ("tokens", "positions", "segment_ids"))
    lp = token_logps(model, params, tok, pos, seg)
    return lp, batch[prefix + "target_mask"][:, 1:]
