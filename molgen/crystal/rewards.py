"""Rewards for RL over the crystal sampler: Chemeleon2's de-novo reward, as host-side numpy.

Every part is computed over the whole RL step's samples (all groups together), then
normalised over them, weighted and summed (Chemeleon2, `rl_module.yaml` / `mp_20/rl_dng.yaml`):
- creativity (weight 1, not normalised): 1 for a unique and novel sample, 0 for one that is
  neither; otherwise the smallest non-zero AMD distance (k = 100, L-infinity, as `amd.AMD_cdist`)
  to the structures of the same reduced formula, training and generated. Here novelty is
  tested for the unique samples only (`metrics.unique_novel`), so the mixed case is "unique but
  in the training set"; an invalid sample scores 0. Two deviations, both because Chemeleon2's
  raw form paid a known structure more than a new one: each AMD is divided by its structure's
  (V/n)^(1/3) (StructureMatcher matches up to a volume scale, so a "known" sample may be 20%
  larger than its training twin and then differ by Å at the 100th neighbour), and the distance
  is clipped to 1. On perov_5 quick the raw form gave known samples 3.7 on average (mean
  creativity 1.8 over the step's samples, 70% of them new at 1).
- energy (weight 1, min-max): -clip(E_hull, 0, 1), a failed or missing E_hull counting as 1 eV/atom.
  `energy_clip` moves the 1 eV/atom: a weak model whose samples all lie above 1 eV/atom gets no
  signal from the default (MP-20 subset quick, docs/crystal.md).
  `hull_supported_only`: a sample whose chemical system holds no training compound counts as 1
  eV/atom too, since its E_hull is measured against elemental references alone (`hull_supported`).
- structure diversity (weight 0.1) and composition diversity (weight 1), both min-max: the
  leave-one-out MMD gain (`mmd_gain`) of each sample's features against the training set's,
  with the kernel (x.y / d + 1)^3; the features are the frozen VAE's mean latents and species
  embeddings, each averaged over the atoms (`train_ldm.vae_features`).
`minmax`: all zeros when max - min < 1e-4, else (x - min) / (max - min + 1e-4) clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np

from molgen.chem import crystal as xtal
from molgen.chem import match_index

PARTS = ("creativity", "energy", "structure_diversity", "composition_diversity")
WEIGHTS = {"creativity": 1.0, "energy": 1.0, "structure_diversity": 0.1, "composition_diversity": 1.0}
NORMALISE = {"creativity": False, "energy": True, "structure_diversity": True, "composition_diversity": True}


def minmax(x, eps: float = 1e-4) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.size == 0 or x.max() - x.min() < eps:
        return np.zeros_like(x)
    return np.clip((x - x.min()) / (x.max() - x.min() + eps), 0.0, 1.0)


def energy(e_hull, supported=None, clip: float = 1.0) -> np.ndarray:
    """-clip(E_hull, 0, clip) eV/atom; NaN (no energy) and, where `supported` is given, an
    unsupported chemical system count as `clip`. Chemeleon2 clips at 1 eV/atom."""
    if not clip > 0:
        raise ValueError(f"reward.energy_clip must be > 0, got {clip}")
    e = np.nan_to_num(np.asarray(e_hull, np.float64), nan=clip)
    if supported is not None:
        e = np.where(np.asarray(supported, bool), e, clip)
    return -np.clip(e, 0.0, clip)


def _poly(a, b, d: int):
    return (a @ b.T / d + 1.0) ** 3


def mmd_ref_term(ref) -> float:
    """The reference set's own term of the unbiased MMD^2 (mean off-diagonal kernel): it does not
    change between RL steps, so `RewardContext` computes it once."""
    r = np.asarray(ref, np.float64)
    n = len(r)
    k_rr = _poly(r, r, r.shape[1])
    return float((k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)))


def mmd_gain(gen, ref, ref_term: float | None = None) -> np.ndarray:
    """Leave-one-out MMD gain of each generated row against `ref` (M >= 3 rows of features (M, d)
    and (N, d)): MMD^2 of the set without the sample minus MMD^2 of the whole set, with unbiased
    within-set terms and the polynomial kernel (x.y / d + 1)^3. Positive: the sample makes the
    generated set more like the reference set. `ref_term`: `mmd_ref_term(ref)`, if already known."""
    g, r = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    m, n, d = len(g), len(r), g.shape[1]
    if m < 3 or n < 2:
        raise ValueError(f"mmd_gain needs >= 3 generated and >= 2 reference rows, got {m} and {n}")
    k_gg, k_gr = _poly(g, g, d), _poly(g, r, d)
    r_term = mmd_ref_term(r) if ref_term is None else ref_term
    big_g, c = k_gg.sum() - np.trace(k_gg), k_gr.sum()
    full = big_g / (m * (m - 1)) + r_term - 2 * c / (m * n)
    s, t = k_gg.sum(1) - np.diag(k_gg), k_gr.sum(1)
    drop = (big_g - 2 * s) / ((m - 1) * (m - 2)) + r_term - 2 * (c - t) / ((m - 1) * n)
    return drop - full


def amd_or_none(c) -> np.ndarray | None:
    """AMD in units of the structure's (V/n)^(1/3); None for a degenerate cell."""
    try:
        return xtal.amd(c) / xtal.amd_scale(c)
    except Exception:  # a degenerate cell has no AMD
        return None


def creativity(crystals, unique, novel, train_index: match_index.MatchIndex) -> np.ndarray:
    """Per sample: 1 unique and novel, 0 neither (or invalid: `unique` False), else the smallest
    non-zero AMD (L-infinity, per (V/n)^(1/3)) distance to the training and generated structures
    of its formula, clipped to 1."""
    unique, novel = np.asarray(unique, bool), np.asarray(novel, bool)
    out = np.where(unique & novel, 1.0, 0.0)
    mixed = np.flatnonzero(unique ^ novel)
    if not len(mixed):
        return out
    amds = {i: amd_or_none(crystals[i]) for i in range(len(crystals)) if crystals[i] is not None}
    formulas = {i: xtal.formula_key(crystals[i].species) for i in amds}
    for i in mixed:
        if amds[i] is None:
            continue
        f = formulas[i]
        others = [a for j, a in amds.items() if j != i and a is not None and formulas[j] == f]
        others += list(train_index.amds(f, per_volume=True))
        if not others:
            continue
        dist = np.abs(np.asarray(others) - amds[i]).max(axis=1)
        dist = dist[dist > 1e-6]  # "non-zero": the same structure up to rounding is skipped, as Chemeleon2 does
        out[i] = min(float(dist.min()), 1.0) if len(dist) else 0.0
    return out


def hull_supported(crystals, train_systems) -> np.ndarray:
    """Whether each sample's chemical system holds a training compound: a training crystal whose
    elements lie inside the sample's, with at least two of them (one, for an elemental sample)."""
    train_systems = [frozenset(s) for s in train_systems]
    out = np.zeros(len(crystals), bool)
    for i, c in enumerate(crystals):
        if c is None:
            continue
        s = frozenset(int(z) for z in c.species)
        out[i] = any(t <= s and len(t) >= min(2, len(s)) for t in train_systems)
    return out


def combine(raw: dict, weights: dict | None = None) -> tuple[np.ndarray, dict]:
    """(total reward, {part: normalised and weighted values}) from raw parts (missing parts and
    weight-0 parts are skipped)."""
    weights = WEIGHTS if weights is None else weights
    parts, total = {}, None
    for name in PARTS:
        w = float(weights.get(name, 0.0))
        if name not in raw or w == 0.0:
            continue
        v = np.asarray(raw[name], np.float64)
        parts[name] = w * (minmax(v) if NORMALISE[name] else v)
        total = parts[name] if total is None else total + parts[name]
    if total is None:
        raise ValueError(f"no reward part with a non-zero weight among {sorted(raw)}")
    if not np.all(np.isfinite(total)):
        bad = [k for k, v in parts.items() if not np.all(np.isfinite(v))]
        raise FloatingPointError(f"non-finite reward in parts {bad}")
    return total, parts
