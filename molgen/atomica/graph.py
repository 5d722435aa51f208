"""Atom and block graphs of interfaces, built on the host (numpy, scipy k-d trees).

An interface record (`atomica.data`) becomes a graph in ATOMICA's layout:
[GLB0, blocks of segment 0, GLB1, blocks of segment 1]. Each global block holds one global atom
at its segment's centroid. Edges run from a neighbour (src) to a receiver (dst), with types
0 intra-segment, 1 inter-segment, 2 global-normal, 3 global-global:
- atom level: every non-global atom receives from its k nearest non-global atoms of its own
  segment and its k nearest of the other segment (types 0, 1); global atoms have no atom edges;
- block level: block position = the mean of its atoms; block distance = the closest atom pair.
  Every non-global block receives from its k nearest blocks (by that distance) of each segment;
  each global block exchanges edges with every block of its segment (type 2) and with the other
  global block (type 3).
`collate` concatenates graphs into one padded, flat graph at fixed capacities with masks;
`Capacity` grows them when a batch needs more (the caller recompiles), never truncating.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy.spatial import cKDTree

from molgen.chem import complexes as cx

K = 8
INTRA, INTER, GLOBAL_NORMAL, GLOBAL_GLOBAL = range(4)
log = logging.getLogger("molgen")


class CapacityOverflow(ValueError):
    """A batch needs more atoms, blocks or edges than the padded capacity."""


ATOM_EXTRA = ("position", "atom_noised")  # per-atom record keys carried into the graph
BLOCK_EXTRA = ("block_dist", "mask_target", "label", "rsa")  # per block (a global block's targets are -1)
BOND_KEYS = ("bonds", "tor_bonds")  # atom-index pairs


def with_globals(ex: dict) -> dict:
    """The record with a global block and atom per segment, in ATOMICA's layout. Keys kept:
    x, element (atom type), atom_block, block_type, block_segment, `ATOM_EXTRA`, `BLOCK_EXTRA`
    and `BOND_KEYS` re-indexed, anything else as it is; adds `block_global`. A segment without
    blocks (a protein on its own) gets no global block."""
    bseg, ablock = np.asarray(ex["block_segment"]), np.asarray(ex["atom_block"])
    x = np.asarray(ex["x"], np.float64)
    aseg = bseg[ablock]
    nb, na = len(bseg), len(x)
    n0, a0 = int((bseg == 0).sum()), int((aseg == 0).sum())
    if (aseg[:a0] != 0).any() or (bseg[:n0] != 0).any():
        raise ValueError("record must list segment 0's blocks and atoms before segment 1's")
    present = [s for s in (0, 1) if (bseg == s).any()]
    # new order: G0, seg-0 blocks, G1, seg-1 blocks (a global slot only for a present segment)
    block_new = np.arange(nb) + 1 + np.where(np.arange(nb) < n0, 0, len(present) - 1)
    atom_new = np.arange(na) + 1 + np.where(np.arange(na) < a0, 0, len(present) - 1)
    g_block = {0: 0, 1: n0 + 1 if 0 in present else 0}
    g_atom = {0: 0, 1: a0 + 1 if 0 in present else 0}
    nb2, na2 = nb + len(present), na + len(present)
    out = {}
    gx = np.zeros((na2, 3))
    gx[atom_new] = x
    el = np.full(na2, cx.GLOBAL_ATOM, np.int32)
    el[atom_new] = ex["element"]
    ab = np.zeros(na2, np.int32)
    ab[atom_new] = block_new[ablock]
    bt = np.full(nb2, cx.GLB, np.int32)
    bt[block_new] = ex["block_type"]
    bs = np.zeros(nb2, np.int32)
    bs[block_new] = bseg
    for s in present:
        gx[g_atom[s]] = x[aseg == s].mean(0)
        ab[g_atom[s]] = g_block[s]
        bs[g_block[s]] = s
    out.update(x=gx, element=el, atom_block=ab, block_type=bt, block_segment=bs, block_global=bt == cx.GLB)
    for k in BOND_KEYS:
        if k in ex:
            out[k] = atom_new[np.asarray(ex[k], np.int64).reshape(-1, 2)].astype(np.int32)
    for k, v in ex.items():
        if k in out:
            continue
        if k in ATOM_EXTRA or k in BLOCK_EXTRA:
            v = np.asarray(v)
            idx, n = (atom_new, na2) if k in ATOM_EXTRA else (block_new, nb2)
            full = np.zeros((n,) + v.shape[1:], v.dtype)
            full[idx] = v
            if k in ("mask_target", "label"):  # a global block is not a target
                full[~np.isin(np.arange(n), idx)] = -1
            out[k] = full
        else:
            out[k] = v
    if "noised" in out:  # the noised segment's global atom moves with it (it is its centroid)
        out["atom_noised"] = bs[ab] == int(out["noised"])
    return out


def _knn(x, seg, ok, k):
    """(src, dst, type) of the k nearest `ok` points of each segment for every `ok` point."""
    src, dst, typ = [], [], []
    for s in (0, 1):
        target = np.flatnonzero(ok & (seg == s))
        if not len(target):
            continue
        tree = cKDTree(x[target])
        for q_seg in (0, 1):
            query = np.flatnonzero(ok & (seg == q_seg))
            if not len(query):
                continue
            same = q_seg == s
            kk = min(k + same, len(target))
            _, j = tree.query(x[query], k=kk)
            j = j.reshape(len(query), kk)
            nb = target[j]
            rows = np.repeat(query, kk)
            keep = nb.ravel() != rows
            if same:  # drop self; a duplicate position may push self out of the list, keep k
                keep &= np.cumsum(keep.reshape(len(query), kk), 1).ravel() <= k
            src.append(nb.ravel()[keep])
            dst.append(rows[keep])
            typ.append(np.full(keep.sum(), INTRA if same else INTER))
    cat = lambda v: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32)  # noqa: E731
    return cat(src), cat(dst), cat(typ)


def block_slots(atom_block) -> np.ndarray:
    """(blocks, largest block) atom indices of each block, -1 past its atoms."""
    atom_block = np.asarray(atom_block)
    order = np.argsort(atom_block, kind="stable")
    starts = np.searchsorted(atom_block[order], np.arange(atom_block.max() + 2))
    size = np.diff(starts)
    slots = np.full((len(size), size.max()), -1)
    for i in range(size.max()):
        has = size > i
        slots[has, i] = order[starts[:-1][has] + i]
    return slots


def block_distance(x, slots, a, b) -> np.ndarray:
    """Closest atom-pair distance between blocks a[i] and b[i] (`slots`: `block_slots`)."""
    pa, pb = slots[a], slots[b]
    d = np.linalg.norm(x[np.maximum(pa, 0)][:, :, None] - x[np.maximum(pb, 0)][:, None], axis=-1)
    d = np.where((pa >= 0)[:, :, None] & (pb >= 0)[:, None], d, np.inf)
    return d.min(axis=(1, 2))


def block_knn(x, atom_block, block_seg, block_global, k=K):
    """(src, dst, type, distance) of the block level's k-NN edges by closest atom pair, exact:
    candidates ordered by a lower bound (centroid distance minus both radii), extended until the
    k-th exact distance is below the next bound."""
    nb = len(block_seg)
    cnt = np.bincount(atom_block, minlength=nb)
    cen = np.zeros((nb, 3))
    np.add.at(cen, atom_block, x)
    cen /= np.maximum(cnt, 1)[:, None]
    rad = np.zeros(nb)
    np.maximum.at(rad, atom_block, np.linalg.norm(x - cen[atom_block], axis=1))
    src, dst, typ, dist = [], [], [], []
    slots = block_slots(atom_block)
    normal = np.flatnonzero(~block_global)
    for q in normal:
        for s in (0, 1):
            t = normal[(block_seg[normal] == s) & (normal != q)]
            if not len(t):
                continue
            lb = np.maximum(np.linalg.norm(cen[t] - cen[q], axis=1) - rad[t] - rad[q], 0.0)
            order = np.argsort(lb, kind="stable")
            m = min(len(t), 3 * k)
            while True:
                cand = t[order[:m]]
                d = block_distance(x, slots, np.full(len(cand), q), cand)
                kk = min(k, len(cand))
                best = np.argsort(d, kind="stable")[:kk]
                if m == len(t) or d[best[-1]] <= lb[order[m]]:
                    break
                m = min(len(t), 2 * m)
            src.append(cand[best])
            dst.append(np.full(kk, q))
            typ.append(np.full(kk, INTRA if s == block_seg[q] else INTER))
            dist.append(d[best])
    for g in np.flatnonzero(block_global):
        mates = normal[block_seg[normal] == block_seg[g]]
        for a, b in ((mates, np.full(len(mates), g)), (np.full(len(mates), g), mates)):
            src.append(a)
            dst.append(b)
            typ.append(np.full(len(mates), GLOBAL_NORMAL))
            dist.append(np.linalg.norm(cen[a] - cen[b], axis=1))
        other = block_global & (block_seg != block_seg[g])
        for o in np.flatnonzero(other):
            src.append(np.array([o]))
            dst.append(np.array([g]))
            typ.append(np.array([GLOBAL_GLOBAL]))
            dist.append(np.array([np.linalg.norm(cen[o] - cen[g])]))
    return (np.concatenate(src).astype(np.int32), np.concatenate(dst).astype(np.int32),
            np.concatenate(typ).astype(np.int32), np.concatenate(dist).astype(np.float32), cen)  # fmt: skip


def build(g: dict, k: int = K) -> dict:
    """Adds the atom and block edges (and block positions) to a record made by `with_globals`."""
    x, ab = np.asarray(g["x"], np.float64), np.asarray(g["atom_block"])
    bseg, bglob = np.asarray(g["block_segment"]), np.asarray(g["block_global"])
    aseg = bseg[ab]
    ok = ~bglob[ab]
    out = dict(g)
    out["atom_src"], out["atom_dst"], out["atom_etype"] = _knn(x, aseg, ok, k)
    s, d, t, dist, cen = block_knn(x, ab, bseg, bglob, k)
    out.update(block_src=s, block_dst=d, block_etype=t, block_edist=dist, block_x=cen.astype(np.float32))
    if "tor_bonds" in g:
        out["tor_nbr"], out["tor_nbr_mask"] = torsion_neighbours(x, ok, np.asarray(g["tor_bonds"]), k)
    return out


def torsion_neighbours(x, ok, bonds, k: int = K, radius: float = 5.0):
    """(T, k) indices of the k nearest non-global atoms within `radius` of each bond's midpoint,
    and their mask (ATOMICA's torsion head reads at most k atoms within 5 Å)."""
    atoms = np.flatnonzero(ok)
    if not len(bonds):
        return np.zeros((0, k), np.int32), np.zeros((0, k), bool)
    mid = (x[bonds[:, 0]] + x[bonds[:, 1]]) / 2
    kk = min(k, len(atoms))
    d, j = cKDTree(x[atoms]).query(mid, k=kk, distance_upper_bound=radius)
    d, j = d.reshape(len(bonds), kk), j.reshape(len(bonds), kk)
    mask = np.isfinite(d)
    nbr = np.where(mask, atoms[np.minimum(j, len(atoms) - 1)], 0)
    pad = k - kk
    return (np.pad(nbr, ((0, 0), (0, pad))).astype(np.int32), np.pad(mask, ((0, 0), (0, pad))))


# --- padding -----------------------------------------------------------------------------------
ATOM_KEYS = ("x", "element", "atom_block")
BLOCK_KEYS = ("block_type", "block_segment", "block_global", "block_x")
SIZES = ("graphs", "atoms", "blocks", "atom_edges", "block_edges", "torsions")


def sizes(graphs: list) -> dict:
    return {"graphs": len(graphs), "atoms": sum(len(g["x"]) for g in graphs),
            "blocks": sum(len(g["block_type"]) for g in graphs),
            "atom_edges": sum(len(g["atom_src"]) for g in graphs),
            "block_edges": sum(len(g["block_src"]) for g in graphs),
            "torsions": sum(len(g.get("tor_bonds", ())) for g in graphs)}  # fmt: skip


@dataclasses.dataclass
class Capacity:
    """Padded sizes of one device's flat graph; `fit` grows them (x1.25, rounded up to 64) when a
    batch needs more, and logs it. One slot of atoms and blocks is kept for padding."""

    graphs: int = 1
    atoms: int = 64
    blocks: int = 64
    atom_edges: int = 64
    block_edges: int = 64
    torsions: int = 64

    def fit(self, need: dict) -> bool:
        grown = {}
        for k in SIZES:
            want = need[k] + (1 if k in ("atoms", "blocks") else 0)
            if want > getattr(self, k):
                new = want if k == "graphs" else int(-(-want * 1.25 // 64) * 64)
                grown[k] = (getattr(self, k), new)
                setattr(self, k, new)
        if grown:
            log.info("graph capacity grows (the step recompiles): %s",
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in grown.items()))  # fmt: skip
        return bool(grown)


@dataclasses.dataclass
class Ladder:
    """Padded sizes chosen per batch from levels `base` x 2^L: the smallest level that holds the
    batch, so padding stays under 2x while a handful of shapes (one compilation each) cover every
    batch; a batch beyond every level used so far adds one (logged), never truncating."""

    base: Capacity
    used: set = dataclasses.field(default_factory=set)

    def level(self, n: int) -> Capacity:
        b = self.base
        return Capacity(b.graphs, *(getattr(b, k) * 2**n for k in SIZES[1:]))

    def pick(self, need: dict) -> Capacity:
        n = 0
        while True:
            cap = self.level(n)
            if all(need[k] + (1 if k in ("atoms", "blocks") else 0) <= getattr(cap, k) for k in SIZES):
                break
            n += 1
        if n not in self.used:
            self.used.add(n)
            log.info("graph capacity level %d (the step compiles once for it): %s", n, cap)
        return cap


def base_capacity(graphs: list, rows: int, margin: float = 1.25) -> Capacity:
    """Level 0 of a `Ladder` for batches of `rows` graphs like `graphs` (a sample): the mean
    size times rows times `margin`, rounded up to 64."""
    mean = {k: np.mean([sizes([g])[k] for g in graphs]) for k in SIZES[1:]}
    return Capacity(rows, *(int(-(-margin * rows * mean[k] // 64) * 64) + 64 for k in SIZES[1:]))


def collate(graphs: list, cap: Capacity, extra_atom=(), extra_block=(), extra_graph=()) -> dict:
    """One flat padded graph. Indices are offset per graph; padding atoms and blocks sit at the
    end (graph index = cap.graphs - 1 with mask 0), padding edges join the last padding atom or
    block to itself. Raises CapacityOverflow when the graphs do not fit."""
    need = sizes(graphs)
    over = {k: (need[k], getattr(cap, k)) for k in SIZES
            if need[k] + (1 if k in ("atoms", "blocks") else 0) > getattr(cap, k)}  # fmt: skip
    if over:
        raise CapacityOverflow("graph batch exceeds its capacity: " +
                               ", ".join(f"{k} needs {a} > {b}" for k, (a, b) in over.items()))  # fmt: skip
    na, nb = cap.atoms, cap.blocks
    out = {}

    def pad(vals, n, fill=0):
        v = np.concatenate(vals)
        full = np.full((n,) + v.shape[1:], fill, v.dtype)
        full[: len(v)] = v
        return full

    a_off = np.cumsum([0] + [len(g["x"]) for g in graphs])
    b_off = np.cumsum([0] + [len(g["block_type"]) for g in graphs])
    for key in ATOM_KEYS + tuple(extra_atom):
        shift = b_off if key == "atom_block" else np.zeros(len(graphs) + 1, np.int64)
        out[key] = pad([np.asarray(g[key]) + shift[i] for i, g in enumerate(graphs)], na)
    out["atom_block"][a_off[-1] :] = nb - 1
    for key in BLOCK_KEYS + tuple(extra_block):
        out[key] = pad([np.asarray(g[key]) for g in graphs], nb)
    out["atom_mask"] = np.arange(na) < a_off[-1]
    out["block_mask"] = np.arange(nb) < b_off[-1]
    out["block_graph"] = pad([np.full(len(g["block_type"]), i) for i, g in enumerate(graphs)], nb, cap.graphs - 1)
    out["atom_graph"] = out["block_graph"][out["atom_block"]]
    out["graph_mask"] = np.arange(cap.graphs) < len(graphs)
    for lvl, off, n, cap_e in (("atom", a_off, na, cap.atom_edges), ("block", b_off, nb, cap.block_edges)):
        for key in ("src", "dst"):
            out[f"{lvl}_{key}"] = pad([np.asarray(g[f"{lvl}_{key}"]) + off[i] for i, g in enumerate(graphs)], cap_e,
                                      n - 1).astype(np.int32)  # fmt: skip
        out[f"{lvl}_etype"] = pad([np.asarray(g[f"{lvl}_etype"]) for g in graphs], cap_e)
        out[f"{lvl}_edge_mask"] = np.arange(cap_e) < sum(len(g[f"{lvl}_src"]) for g in graphs)
    out["block_edist"] = pad([np.asarray(g["block_edist"]) for g in graphs], cap.block_edges)
    for key in extra_graph:
        out[key] = pad([np.asarray(g[key])[None] for g in graphs], cap.graphs)
    if all("tor_bonds" in g for g in graphs):
        nt = cap.torsions
        out["tor_u"] = pad([np.asarray(g["tor_bonds"][:, 0]) + a_off[i] for i, g in enumerate(graphs)], nt, na - 1)
        out["tor_v"] = pad([np.asarray(g["tor_bonds"][:, 1]) + a_off[i] for i, g in enumerate(graphs)], nt, na - 1)
        out["tor_nbr"] = pad([np.asarray(g["tor_nbr"]) + a_off[i] for i, g in enumerate(graphs)], nt, na - 1)
        out["tor_nbr_mask"] = pad([np.asarray(g["tor_nbr_mask"]) for g in graphs], nt)
        out["tor_score"] = pad([np.asarray(g["tor_score"], np.float32) for g in graphs], nt)
        out["tor_graph"] = pad([np.full(len(g["tor_bonds"]), i) for i, g in enumerate(graphs)], nt, cap.graphs - 1)
        out["tor_mask"] = np.arange(nt) < sum(len(g["tor_bonds"]) for g in graphs)
    out["x"] = out["x"].astype(np.float32)
    out["block_x"] = out["block_x"].astype(np.float32)
    return out
