"""ATOMICA's pretraining corruption of one interface, on the host (numpy).

One segment is noised (uniformly among those with at least 3 atoms; an interface with none
gets translation only), in ATOMICA's order:
1. rotation about the segment's centroid by an IGSO(3) draw, sigma 0.25, angle at most 0.5 rad;
   target: the axis times d/dtheta log p(theta) (the density including the Haar measure);
2. translation by eps * z, eps ~ U(0.1, 1) Å, z ~ N(0, I); target z and eps (the loss is
   |eps * prediction + z|^2, so zero predicts a loss of 3 per item: 1 per component);
3. torsions: each rotatable bond of the segment turned by delta ~ N(0, 0.5^2) in turn; a small
   molecule is then aligned back (Kabsch) on its pre-torsion pose; target: the wrapped-normal
   score d/d delta log p(delta);
4. masking: 10% of the blocks of both segments (at least one) collapse to one mask atom at their
   centroid, block type MASK; target: the original type.
Rotatable bonds (`rotatable`, as ATOMICA's `torsion.py`): a bond whose removal splits the graph
into two parts of more than one atom each (so no ring bond); the smaller part moves. In protein
and nucleic-acid segments each block is its own graph, bonds between backbone atoms are not
rotatable, and the moving part is flipped to the side without backbone (a bond with backbone on
both sides is not rotatable).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from molgen.atomica import data as ad
from molgen.chem import complexes as cx

ROT_SIGMA, ROT_MAX = 0.25, 0.5
TOR_SIGMA = 0.5
TR_EPS = (0.1, 1.0)
MASK_RATIO = 0.1
BACKBONE_POS = {ad.POSITIONS.index(p) for p in ("N", "CA", "C", "O", "P", "OP", "'")}


# --- IGSO(3) -----------------------------------------------------------------------------------
def igso3_f(theta, sigma: float = ROT_SIGMA, lmax: int = 2000) -> np.ndarray:
    """The IGSO(3) series f(theta) = sum_l (2l+1) exp(-l(l+1) sigma^2) sin((l+1/2) theta) / sin(theta/2)."""
    theta = np.asarray(theta, np.float64)[..., None]
    ell = np.arange(lmax)
    terms = (2 * ell + 1) * np.exp(-ell * (ell + 1) * sigma**2) * np.sin((ell + 0.5) * theta) / np.sin(theta / 2)
    return terms.sum(-1)


@functools.lru_cache(maxsize=4)
def igso3_table(sigma: float = ROT_SIGMA, max_angle: float = ROT_MAX, n: int = 2000):
    """(theta grid, CDF, score d/dtheta log[f (1 - cos theta)]) on (0, max_angle]."""
    theta = np.linspace(1e-3, max_angle, n)
    dens = igso3_f(theta, sigma) * (1 - np.cos(theta)) / np.pi
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(theta))])
    log_p = np.log(np.maximum(dens, 1e-300))
    score = np.gradient(log_p, theta)
    return theta, cdf / cdf[-1], score


def igso3_density(theta, sigma: float = ROT_SIGMA, max_angle: float = ROT_MAX) -> np.ndarray:
    """The truncated angle density p(theta) on (0, max_angle], normalised."""
    grid, cdf, _ = igso3_table(sigma, max_angle)
    raw = lambda t: igso3_f(t, sigma) * (1 - np.cos(t)) / np.pi  # noqa: E731
    z = np.trapezoid(raw(grid), grid)
    return raw(np.asarray(theta)) / z


def sample_rotation(rng) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 rotation matrix, score target: unit axis times the angle's score)."""
    grid, cdf, score = igso3_table()
    theta = float(np.interp(rng.uniform(), cdf, grid))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return axis_angle(axis, theta), axis * float(np.interp(theta, grid, score))


def axis_angle(axis, theta) -> np.ndarray:
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


# --- torsions ----------------------------------------------------------------------------------
def wrapped_normal_score(delta, sigma: float = TOR_SIGMA, n: int = 10) -> np.ndarray:
    """d/d delta log sum_k N(delta + 2 pi k; 0, sigma^2)."""
    d = np.asarray(delta, np.float64)[..., None] + 2 * np.pi * np.arange(-n, n + 1)
    w = np.exp(-(d**2) / (2 * sigma**2) - np.max(-(d**2) / (2 * sigma**2), axis=-1, keepdims=True))
    return (w * (-d / sigma**2)).sum(-1) / w.sum(-1)


def _components(n, edges):
    if not len(edges):
        return n, np.arange(n)
    m = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(m, directed=False)


def rotatable(n: int, bonds: np.ndarray, backbone: np.ndarray | None = None) -> list[tuple[int, int, np.ndarray]]:
    """[(u, v, moving atom mask)] of one graph: turning about u-v moves the atoms of the mask (v's side)."""
    out = []
    bonds = np.asarray(bonds).reshape(-1, 2)
    for e, (u, v) in enumerate(bonds):
        if backbone is not None and backbone[u] and backbone[v]:
            continue
        ncomp, lab = _components(n, np.delete(bonds, e, axis=0))
        if lab[u] == lab[v]:
            continue  # a ring bond
        side_u, side_v = lab == lab[u], lab == lab[v]
        if side_u.sum() <= 1 or side_v.sum() <= 1:
            continue
        moving_v = side_v.sum() <= side_u.sum()
        if backbone is not None:
            bb_u, bb_v = backbone[side_u].any(), backbone[side_v].any()
            if bb_u and bb_v:
                continue
            moving_v = not bb_v
        if moving_v:
            out.append((int(u), int(v), side_v))
        else:
            out.append((int(v), int(u), side_u))
    return out


def segment_torsions(ex: dict, seg: int) -> list[tuple[int, int, np.ndarray]]:
    """Rotatable bonds of one segment of a record, with moving masks over all its atoms."""
    x = np.asarray(ex["x"])
    n = len(x)
    ab, bseg, bt = np.asarray(ex["atom_block"]), np.asarray(ex["block_segment"]), np.asarray(ex["block_type"])
    bonds = np.asarray(ex["bonds"]).reshape(-1, 2)
    in_seg = bseg[ab] == seg
    bonds = bonds[in_seg[bonds[:, 0]] & in_seg[bonds[:, 1]]]
    blocks = np.flatnonzero(bseg == seg)
    polymer = bool(np.any((bt[blocks] >= cx.AA_START) & (bt[blocks] < cx.ELEMENT_START) | (bt[blocks] == cx.UNK)))
    out = []
    if polymer:
        bb = np.isin(np.asarray(ex["position"]), list(BACKBONE_POS))
        for b in blocks:
            atoms = np.flatnonzero(ab == b)
            local = np.full(n, -1)
            local[atoms] = np.arange(len(atoms))
            bb_block = bonds[(ab[bonds[:, 0]] == b) & (ab[bonds[:, 1]] == b)]
            for u, v, mv in rotatable(len(atoms), local[bb_block], bb[atoms]):
                full = np.zeros(n, bool)
                full[atoms[mv]] = True
                out.append((int(atoms[u]), int(atoms[v]), full))
    else:
        atoms = np.flatnonzero(in_seg)
        local = np.full(n, -1)
        local[atoms] = np.arange(len(atoms))
        for u, v, mv in rotatable(len(atoms), local[bonds]):
            full = np.zeros(n, bool)
            full[atoms[mv]] = True
            out.append((int(atoms[u]), int(atoms[v]), full))
    return out


def turn(x: np.ndarray, u: int, v: int, moving: np.ndarray, delta: float) -> np.ndarray:
    """Rotate the moving atoms by delta about the u -> v axis through v."""
    axis = x[v] - x[u]
    r = axis_angle(axis / np.linalg.norm(axis), delta)
    out = x.copy()
    out[moving] = (x[moving] - x[v]) @ r.T + x[v]
    return out


def kabsch(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`mobile` rigidly superposed on `target` (least squares)."""
    cm, ct = mobile.mean(0), target.mean(0)
    h = (mobile - cm).T @ (target - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1, 1, d]) @ u.T
    return (mobile - cm) @ r.T + ct


# --- the whole corruption ----------------------------------------------------------------------
def corrupt(ex: dict, rng, mask_ratio: float = MASK_RATIO) -> dict:
    """The record after ATOMICA's noise, with its targets: `noised` (segment), `tr_z` (3,),
    `tr_eps`, `rot_score` (3,), `rot_ok`, `tor_bonds` (T, 2), `tor_score` (T,), `mask_target`
    (per block: original type of a masked block, else -1), `atom_noised` (per atom)."""
    ex = {k: np.array(v) for k, v in ex.items()}
    x = np.asarray(ex["x"], np.float64)
    ab, bseg = ex["atom_block"], ex["block_segment"]
    aseg = bseg[ab]
    counts = [int((aseg == s).sum()) for s in (0, 1)]
    big = [s for s in (0, 1) if counts[s] >= 3]
    seg = int(rng.choice(big)) if big else int(rng.integers(2))
    sel = aseg == seg
    out = {"noised": np.int32(seg)}
    if big:  # 1. rotation
        r, score = sample_rotation(rng)
        c = x[sel].mean(0)
        x[sel] = (x[sel] - c) @ r.T + c
        out["rot_score"], out["rot_ok"] = score.astype(np.float32), np.float32(1.0)
    else:
        out["rot_score"], out["rot_ok"] = np.zeros(3, np.float32), np.float32(0.0)
    eps = rng.uniform(*TR_EPS)  # 2. translation
    z = rng.normal(size=3)
    x[sel] += eps * z
    out["tr_z"], out["tr_eps"] = z.astype(np.float32), np.float32(eps)
    ex["x"] = x  # 3. torsions
    tors = segment_torsions(ex, seg)
    deltas = rng.normal(0.0, TOR_SIGMA, len(tors))
    before = x.copy()
    for (u, v, mv), dl in zip(tors, deltas, strict=True):
        x = turn(x, u, v, mv, dl)
    polymer = any(cx.AA_START <= t < cx.ELEMENT_START or t == cx.UNK for t in ex["block_type"][bseg == seg])
    if tors and not polymer:
        x[sel] = kabsch(x[sel], before[sel])
    ex["x"] = x
    score = wrapped_normal_score(deltas)
    # 4. masking (both segments), after the geometric noise
    nb = len(bseg)
    n_mask = max(1, int(round(mask_ratio * nb)))
    masked = np.zeros(nb, bool)
    masked[rng.choice(nb, min(n_mask, nb), replace=False)] = True
    out["mask_target"] = np.where(masked, ex["block_type"], -1).astype(np.int32)
    ex, rows, keep = collapse(ex, masked)
    new_index = np.cumsum(rows) - 1
    ok = np.array([keep[u] and keep[v] for u, v, _ in tors], bool)
    out["tor_bonds"] = np.array([(new_index[u], new_index[v]) for (u, v, _), k in zip(tors, ok, strict=True) if k],
                                np.int32).reshape(-1, 2)  # fmt: skip
    out["tor_score"] = score[ok].astype(np.float32) if len(tors) else np.zeros(0, np.float32)
    out["atom_noised"] = ex["block_segment"][ex["atom_block"]] == seg
    ex.update(out)
    return ex


def collapse(ex: dict, masked: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Masked blocks as one mask atom at their centroid (block type MASK). Returns (record, rows:
    the old atoms that have a row in the new record, in order, keep: the old atoms outside
    masked blocks)."""
    x, ab = np.asarray(ex["x"]), np.asarray(ex["atom_block"])
    first = np.zeros(len(ab), bool)
    seen = set()
    for i, b in enumerate(ab):
        if masked[b] and b not in seen:
            first[i] = True
            seen.add(b)
    keep = ~masked[ab]
    rows = keep | first
    out = dict(ex)
    cen = np.zeros((len(masked), 3))
    np.add.at(cen, ab, x)
    cen /= np.maximum(np.bincount(ab, minlength=len(masked)), 1)[:, None]
    nx = x.copy()
    nx[first] = cen[ab[first]]
    el = np.array(ex["element"])
    el[first] = cx.MASK_ATOM
    out["x"], out["element"], out["atom_block"] = nx[rows], el[rows], ab[rows]
    if "position" in ex:
        pos = np.array(ex["position"])
        pos[first] = ad.POSITIONS.index("")
        out["position"] = pos[rows]
    new = np.cumsum(rows) - 1
    bonds = np.asarray(ex["bonds"]).reshape(-1, 2)
    out["bonds"] = new[bonds[keep[bonds[:, 0]] & keep[bonds[:, 1]]]].astype(np.int32).reshape(-1, 2)
    bt = np.array(ex["block_type"])
    bt[masked] = cx.MASK
    out["block_type"] = bt
    return out, rows, keep
