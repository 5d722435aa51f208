"""Chemistry-aware tokenizer for enriched-SMILES units; decode(encode(text)) == text exactly.

Outside `<...>` the text is split into SMILES tokens (bracket atoms, organic atoms,
bonds, branches, ring digits, tags). A coordinate block `<-2.7704,1.211,0.3>` becomes
`<-2` `.77` `04` `,1` `.21` `1` `,0` `.3` `>`: a delimiter fused with the signed integer
part, then the decimals in pairs. Anything else falls back to one token per ASCII
character, so every ASCII string round-trips. The vocabulary is a fixed enumeration
(no training), identical on every machine.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from molgen.chem.enriched import CONF_END, CONF_TAG, SMILES_END, SMILES_TAG, is_atom_token, smiles_tokens

PAD, EOT = "<pad>", "<eot>"
SPECIALS = (PAD, EOT, SMILES_TAG, SMILES_END, CONF_TAG, CONF_END)
_ELEMENTS = ("C", "N", "O", "S", "P", "F", "Cl", "Br", "I", "B", "Si", "Se", "H", "c", "n", "o", "s", "p", "b", "se")
_CHIRAL = ("", "@", "@@")
_HCOUNT = ("", "H", "H2", "H3")
_CHARGE = ("", "+", "-", "+2", "-2")
_NUM = r"(-?\d+)(?:\.(\d{1,4}))?"
_COORD_RE = re.compile(f"<{_NUM},{_NUM},{_NUM}>")
_PIECE_RE = re.compile(r"(<[^<>]*>)")
_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")


@functools.lru_cache(maxsize=1)
def vocab() -> tuple[str, ...]:
    toks: list[str] = list(SPECIALS)
    toks += ["Cl", "Br", "B", "C", "N", "O", "P", "S", "F", "I", "b", "c", "n", "o", "p", "s"]
    toks += list("-=#$:/\\.()") + [str(d) for d in range(10)] + [f"%{d}" for d in range(10, 100)]
    toks += [f"[{e}{c}{h}{q}]" for e in _ELEMENTS for c in _CHIRAL for h in _HCOUNT for q in _CHARGE]
    ints = ["-0"] + [str(i) for i in range(-99, 100)]
    toks += [p + i for p in "<," for i in ints] + [">"]
    toks += [f".{d}" for d in range(10)] + [f".{d:02d}" for d in range(100)] + [f"{d:02d}" for d in range(100)]
    toks += [chr(c) for c in range(32, 127)]
    seen, out = set(), []
    for t in toks:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, int]:
    return {t: i for i, t in enumerate(vocab())}


PAD_ID, EOT_ID = 0, 1
SMILES_ID, SMILES_END_ID, CONF_ID, CONF_END_ID = 2, 3, 4, 5


def vocab_size(multiple: int = 128) -> int:
    """Vocabulary size padded to a multiple (for matmul-friendly embeddings)."""
    n = len(vocab())
    return -(-n // multiple) * multiple


def _coord_pieces(block: str) -> list[str] | None:
    """Split `<x,y,z>` into tokens; None if the block is not a coordinate triple we cover."""
    m = _COORD_RE.fullmatch(block)
    if m is None:
        return None
    out, idx = [], _index()
    for delim, (ipart, frac) in zip("<,,", zip(m.groups()[::2], m.groups()[1::2], strict=False), strict=False):
        if delim + ipart not in idx:
            return None
        out.append(delim + ipart)
        if frac is not None:
            out += [f".{frac[:2]}"] + ([frac[2:]] if len(frac) > 2 else [])
    return out + [">"]


def _strings(text: str) -> list[str]:
    idx, out = _index(), []
    for piece in _PIECE_RE.split(text):
        if not piece:
            continue
        coords = _coord_pieces(piece) if piece.startswith("<") else None
        if coords is not None:
            out += coords
            continue
        for chunk in _TAG_RE.split(piece):
            if chunk in SPECIALS:
                out.append(chunk)
                continue
            for tok in smiles_tokens(chunk):
                out += [tok] if tok in idx else list(tok)
    return out


def encode(text: str) -> np.ndarray:
    """Token ids (int32) of `text`; raises ValueError naming the character if it is not ASCII."""
    idx = _index()
    try:
        return np.asarray([idx[t] for t in _strings(text)], np.int32)
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} has no token (text {text[:60]!r})") from None


def missing_atom_tokens(smiles: str) -> list[str]:
    """Atoms of a SMILES (or enriched string) whose bracketed form, as the conformer writes it, has
    no single token (e.g. `[Sn]`, `[Na+]`, isotopes): the model could only spell them character by
    character, which it never saw."""
    idx, out = _index(), set()
    for t in smiles_tokens(re.sub(r"<[^>]*>", "", smiles)):
        if is_atom_token(t) and t not in SPECIALS:
            atom = t if t.startswith("[") else f"[{t}]"
            if atom not in idx:
                out.add(atom)
    return sorted(out)


def decode(ids) -> str:
    v = vocab()
    return "".join(v[int(i)] for i in ids if 0 < int(i) < len(v) and int(i) != EOT_ID)


# --- positions ---------------------------------------------------------------------------
# "sequential": 0, 1, 2, ... (plain RoPE positions).
# "aligned" (position coupling): the conformer's j-th skeleton token (atom, bond, ring digit,
# branch) sits exactly ALIGN_OFFSET positions after the prompt's j-th SMILES token, and the
# coordinate tokens of a block take fractional positions between skeleton tokens
# (j + (i+1)/16). Copying the skeleton then needs only a fixed relative offset, which a
# small model learns in minutes instead of hours. Positions are model inputs, so this
# changes no architecture (the Hugging Face parity holds) and text is unchanged.
ALIGN_OFFSET = 256
COORD_STEP = 1.0 / 16


@functools.lru_cache(maxsize=1)
def token_kinds() -> tuple[np.ndarray, np.ndarray]:
    """(opens_coordinate_block [V], closes_coordinate_block [V]) over the padded vocabulary."""
    v = vocab_size()
    opens, closes = np.zeros(v, bool), np.zeros(v, bool)
    for i, t in enumerate(vocab()):
        opens[i] = t.startswith("<") and t not in SPECIALS
        closes[i] = t == ">"
    return opens, closes


def positions(ids, mode: str = "sequential") -> np.ndarray:
    """Float32 RoPE positions for a token sequence that starts at a unit's beginning."""
    return positions_and_state(ids, mode)[0]


def positions_and_state(ids, mode: str = "sequential"):
    """(positions, (in_coord, j, i)): the state lets `next_position` continue after `ids`."""
    ids = np.asarray(ids)
    if mode == "sequential":
        return np.arange(len(ids), dtype=np.float32), (False, 0, 0)
    if mode != "aligned":
        raise ValueError(f"positions mode {mode!r} is not 'sequential' or 'aligned'")
    opens, closes = token_kinds()
    out = np.zeros(len(ids), np.float32)
    base, j, i, in_coord = 0.0, 0, 0, False
    for k, t in enumerate(ids):
        if t == CONF_ID:
            base, j, in_coord = float(ALIGN_OFFSET), 0, False
            out[k] = base
            continue
        if in_coord or opens[t]:
            i = 0 if opens[t] else i + 1
            in_coord = not closes[t]
            out[k] = base + j + (i + 1) * COORD_STEP
        else:
            j += 1
            out[k] = base + j
    head = slice(0, int(np.argmax(ids == CONF_ID)) if (ids == CONF_ID).any() else len(ids))  # the prompt part
    ends = ids[head] == SMILES_END_ID
    if ends.any() and out[head][ends].max() >= ALIGN_OFFSET:
        raise ValueError(
            f"SMILES of {int(out[head][ends].max())} tokens is too long for aligned positions "
            f"(at most {ALIGN_OFFSET - 2})"
        )
    return out, (in_coord, j, i)


def next_position(prev_pos, prev_in_coord, prev_j, prev_i, tok, mode: str):
    """jnp version of one step of `positions` for decoding: (pos, in_coord, j, i) of token `tok`."""
    import jax.numpy as jnp

    if mode == "sequential":
        return prev_pos + 1.0, prev_in_coord, prev_j, prev_i
    opens, closes = (jnp.asarray(x) for x in token_kinds())
    is_open, is_close = opens[tok], closes[tok]
    coord = prev_in_coord | is_open
    i = jnp.where(is_open, 0, prev_i + 1)
    j = jnp.where(coord, prev_j, prev_j + 1)
    pos = jnp.where(coord, ALIGN_OFFSET + j + (i + 1) * COORD_STEP, ALIGN_OFFSET + j)
    return pos.astype(jnp.float32), coord & ~is_close, j, jnp.where(coord, i, prev_i)


# --- coordinate-block grammar (constrained decoding) -------------------------------------
# Token classes and a small automaton over them. A block is `<int` [`.dd` [`dd`]] `,int`
# [...] `,int` [...] `>`; the state is 3 k + f with k the delimiters seen in the open block
# (0: outside a block) and f the fraction tokens after the last one (0, 1 or 2). Outside a
# block only a comma, a close, a fraction token or the bare `<` / `,` characters are forbidden
# (SMILES never has them), so the automaton constrains coordinates only and never rejects a
# unit that `encode` produces (tests/test_chem_enriched.py checks 3,000 MOSES units).
G_OTHER, G_OPEN, G_COMMA, G_CLOSE, G_FRAC, G_DIGITS, G_NEVER = range(7)


@functools.lru_cache(maxsize=1)
def grammar_classes() -> np.ndarray:
    """Grammar class of every id of the padded vocabulary (ids past the vocabulary: G_OTHER)."""
    cls = np.full(vocab_size(), G_OTHER, np.int32)
    for i, t in enumerate(vocab()):
        if t in SPECIALS:
            continue
        if t in ("<", ","):
            cls[i] = G_NEVER  # bare characters: a `<` would open a block the automaton cannot follow
        elif re.fullmatch(r"<-?\d+", t):
            cls[i] = G_OPEN
        elif re.fullmatch(r",-?\d+", t):
            cls[i] = G_COMMA
        elif t == ">":
            cls[i] = G_CLOSE
        elif re.fullmatch(r"\.\d{1,2}", t):
            cls[i] = G_FRAC
        elif re.fullmatch(r"\d{1,2}", t):
            cls[i] = G_DIGITS  # also SMILES ring-bond digits outside a block
    return cls


@functools.lru_cache(maxsize=1)
def grammar_table() -> np.ndarray:
    """allowed[state, class] for the 12 automaton states (3 k + f)."""
    allowed = np.zeros((12, 7), bool)
    allowed[0, [G_OTHER, G_OPEN, G_DIGITS]] = True
    for k in (1, 2, 3):
        delim = G_COMMA if k < 3 else G_CLOSE
        allowed[3 * k + 0, [G_FRAC, delim]] = True
        allowed[3 * k + 1, [G_DIGITS, delim]] = True
        allowed[3 * k + 2, [delim]] = True
    return allowed


@functools.lru_cache(maxsize=1)
def grammar_transitions() -> np.ndarray:
    """next_state[state, class]: `<int` opens a block (k=1), `,int` moves to the next
    coordinate, `>` closes it, fraction and digit tokens inside a block count up f (to 2);
    every other class leaves the state as it is."""
    nxt = np.repeat(np.arange(12, dtype=np.int32)[:, None], 7, axis=1)
    for st in range(12):
        k, f = divmod(st, 3)
        nxt[st, G_OPEN], nxt[st, G_COMMA], nxt[st, G_CLOSE] = 3, 3 * min(k + 1, 3), 0
        if k:
            nxt[st, [G_FRAC, G_DIGITS]] = 3 * k + min(f + 1, 2)
    return nxt


def _grammar_walk(ids):
    """(index, token class, automaton state before the token, state after it) along `ids`,
    starting outside a block; the state follows the transitions whether or not a token is allowed."""
    st = 0
    for n, c in enumerate(grammar_classes()[np.asarray(ids, np.int64)]):
        nxt = grammar_next_host(st, int(c))
        yield n, int(c), st, nxt
        st = nxt


def grammar_violation(ids) -> tuple[int, int]:
    """(index of the first token of `ids` the automaton forbids, or -1; the automaton state
    before that token, or after all of them), starting outside a block (host side)."""
    table, end = grammar_table(), 0
    for n, c, st, after in _grammar_walk(ids):
        if not table[st, c]:
            return n, st
        end = after
    return -1, end


def grammar_step_end(ids, start: int) -> int:
    """Index of the token that ends the step starting at `start`: the first token from `start` on
    after which the automaton is outside a block (the `>` of a coordinate block that is open at
    `start` or opened there; `start` itself for a skeleton token); len(ids) - 1 if none."""
    for n, _, _, after in _grammar_walk(ids):
        if n >= start and after == 0:
            return n
    return len(ids) - 1


def grammar_accepts(ids) -> bool:
    """Whether the automaton allows every token of `ids`, starting outside a block (host side)."""
    return grammar_violation(ids)[0] < 0


def grammar_next_host(st: int, c: int) -> int:
    """The automaton step on the host: state `st`, token class `c`."""
    return int(grammar_transitions()[st, c])


def grammar_next(state_B, tok_B):
    """jnp: the automaton state after token `tok_B` (one decoding step)."""
    import jax.numpy as jnp

    return jnp.asarray(grammar_transitions())[state_B, jnp.asarray(grammar_classes())[tok_B]]


def grammar_mask(state_B):
    """jnp: [B, V] True where the token is allowed in the state."""
    import jax.numpy as jnp

    return jnp.asarray(grammar_table())[state_B][:, jnp.asarray(grammar_classes())]
