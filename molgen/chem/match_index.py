"""Novelty and uniqueness at scale: StructureMatcher answers over a formula-bucketed index with a
prefilter that skips only pairs the matcher must reject, matched in parallel (`pmap`).
The crystal helpers it builds on (matcher, AMD, formulas) are in `molgen.chem.crystal`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings

import numpy as np

from molgen.chem.crystal import AMD_K, MATCHER, Crystal, amd, amd_scale, formula_key, matcher, to_structure

log = logging.getLogger("molgen")


def _minima(lattice) -> np.ndarray:
    """Successive minima of a pymatgen Lattice: the shortest vector, the shortest one independent of
    it, the shortest one independent of both (greedy over the vectors no longer than the longest
    cell vector, which holds three independent ones)."""
    fc, d, _, _ = lattice.get_points_in_sphere([[0, 0, 0]], [0, 0, 0], max(lattice.abc) * (1 + 1e-6), zip_results=False)
    vecs, d = np.asarray(fc) @ lattice.matrix, np.asarray(d)
    basis, out = np.zeros((0, 3)), []
    for i in np.argsort(d, kind="stable"):
        b = np.vstack([basis, vecs[i]])
        if d[i] > 1e-8 and np.linalg.matrix_rank(b, tol=1e-6 * d[i]) == len(b):
            basis, out = b, out + [d[i]]
            if len(out) == 3:
                break
    return np.asarray(out)


@dataclasses.dataclass
class Fingerprint:
    """What `MatchIndex` keeps of a crystal. `cell` is the matcher's own reduced cell (Niggli, then
    primitive) as (lattice, frac, species); lengths are per (V/n)^(1/3), as the matcher scales
    both structures to one volume before comparing them."""

    formula: str
    cell: tuple
    n: int  # sites in the reduced cell
    minima: np.ndarray  # (3,) successive minima of the reduced lattice
    lengths: np.ndarray  # (3,) sorted lengths of the reduced cell's vectors
    amd: np.ndarray  # (AMD_K,)


def fingerprint(c: Crystal) -> Fingerprint | None:
    """None where the cell cannot be reduced (degenerate): StructureMatcher.fit raises on every
    pair with it, which MatchIndex counts as no match."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the reduction StructureMatcher.fit does itself (and caches only 300 of); fit with
            # skip_structure_reduction=True on the reduced cells gives fit's answer on the originals
            r = matcher()._get_reduced_structure(to_structure(c), primitive_cell=True, niggli=True)
            u = (r.volume / len(r)) ** (1 / 3)
            cell = (np.asarray(r.lattice.matrix), np.asarray(r.frac_coords), np.asarray([x.specie.Z for x in r]))
            return Fingerprint(formula_key(c.species), cell, len(r), _minima(r.lattice) / u,
                               np.sort(r.lattice.abc) / u, amd(r) / u)  # fmt: skip
    except ImportError:
        raise
    except Exception:  # pymatgen raises ValueError, LinAlgError, ... on degenerate cells
        return None


# ----------------------------------------------------------------------------- parallel matching

_REFS: list = []  # reduced reference structures, per worker process (or in-process when run inline)
PROGRESS_S = 5.0  # seconds between progress lines
POOL_MIN = 300  # fewer candidate pairs (or crystals to fingerprint) than this run in this process


def _set_refs(cells) -> None:
    global _REFS
    _REFS = [to_structure(Crystal(*cell)) for cell in cells]


def _fit_any(task) -> bool:
    """Whether the query cell matches one of the reference cells `cand` (indices into _REFS); stops
    at the first match."""
    cell, cand = task
    sm, s = matcher(), to_structure(Crystal(*cell))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in cand:
            try:
                if sm.fit(s, _REFS[j], skip_structure_reduction=True):
                    return True
            except Exception:  # degenerate cells make pymatgen raise: no match, as before
                continue
    return False


def _indexed(job):
    fn, i, x = job
    return i, fn(x)


def pmap(fn, items, workers: int, what: str, initializer=None, initargs=()) -> list:
    """[fn(x) for x in items] in order, over a pool of `workers` spawned processes (in this process
    when workers <= 1), with a progress line (rate, ETA) on the "molgen" logger every PROGRESS_S s.
    `initializer(*initargs)` runs once in each worker first."""
    import multiprocessing as mp

    items, out = list(items), [None] * len(items)
    t0 = last = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers, initializer, initargs) if workers > 1 and len(items) > 1 else None
    try:
        if pool is None:
            if initializer is not None:
                initializer(*initargs)
            results = enumerate(map(fn, items))
        else:
            results = pool.imap_unordered(_indexed, [(fn, i, x) for i, x in enumerate(items)])
        for done, (i, r) in enumerate(results, 1):
            out[i] = r
            now = time.perf_counter()
            if now - last > PROGRESS_S and done < len(items):
                rate = done / (now - t0)
                log.info("%s: %d/%d, %.1f/s, ETA %.0f s", what, done, len(items), rate, (len(items) - done) / rate)
                last = now
    finally:
        if pool is not None:
            pool.terminate()
    return out


class MatchIndex:
    """Structures bucketed by reduced formula, for novelty/uniqueness tests with StructureMatcher
    (MATCHER tolerances, pymatgen's defaults otherwise: primitive cells, scaled to one volume, no
    supercells). The answers are those of StructureMatcher.fit(query, structure) over the whole
    bucket; only pairs the matcher must reject are skipped, by conditions that fit itself imposes:
    - the same reduced formula (fit compares compositions first);
    - the same number of sites in the reduced cells (fit maps sites one to one);
    - fit looks for three independent vectors of the query's lattice, each within a factor
      (1 + ltol) of one of the reference's reduced cell vectors, after scaling both to one volume;
      so the query's k-th successive minimum is below (1 + ltol) x the reference's k-th shortest
      cell vector, for k = 1, 2, 3.
    The remaining candidates are tried nearest AMD first (a match usually comes first), in
    parallel over `workers` processes (default: all cores), with a progress line."""

    def __init__(self, crystals=(), workers: int | None = None):
        self.workers = workers or len(os.sched_getaffinity(0)) or 1
        self._crystals: list[Crystal] = []
        self._fp: dict[int, Fingerprint | None] = {}  # fingerprints made so far, by index
        self._by_formula: dict[str, list[int]] = {}
        self._buckets: dict[str, tuple] = {}  # formula -> (indices, sites, lengths, AMDs) of its crystals
        for c in crystals:
            self.add(c)

    def add(self, c: Crystal) -> None:
        f = formula_key(c.species)
        self._by_formula.setdefault(f, []).append(len(self._crystals))
        self._crystals.append(c)
        self._buckets.pop(f, None)

    def __len__(self) -> int:
        return len(self._crystals)

    @property
    def prints(self) -> list[Fingerprint | None]:
        """Every crystal's fingerprint, in the order added (None: a cell that cannot be reduced)."""
        self.build()
        return [self._fp[i] for i in range(len(self._crystals))]

    def build(self, formulas=None) -> None:
        """Fingerprint the crystals of these reduced formulas (default: all) not fingerprinted yet.
        Queries build only their own formulas' buckets: on a varied training set (MP-20, most
        formulas with 1-3 crystals) the samples touch a small part of it."""
        formulas = list(self._by_formula) if formulas is None else [f for f in formulas if f in self._by_formula]
        todo = [i for f in formulas if f not in self._buckets for i in self._by_formula[f] if i not in self._fp]
        if todo:
            workers = self.workers if len(todo) >= POOL_MIN else 1
            made = pmap(fingerprint, [self._crystals[i] for i in todo], workers, "fingerprints")
            self._fp.update(zip(todo, made, strict=True))
        for f in formulas:
            if f not in self._buckets:
                ix = [i for i in self._by_formula[f] if self._fp[i] is not None]
                self._buckets[f] = (np.asarray(ix, int), np.asarray([self._fp[i].n for i in ix], int),
                                    np.asarray([self._fp[i].lengths for i in ix]).reshape(-1, 3),
                                    np.asarray([self._fp[i].amd for i in ix]).reshape(len(ix), -1))  # fmt: skip

    def amds(self, formula: str, per_volume: bool = False) -> np.ndarray:
        """(k, AMD_K) AMD vectors of the structures of this reduced formula (k = 0 if none); with
        `per_volume`, in units of each structure's (V/n)^(1/3) (`amd_scale`)."""
        if formula not in self._by_formula:
            return np.zeros((0, AMD_K))
        self.build([formula])
        ix, _, _, a = self._buckets[formula]
        if per_volume:
            a = a / np.asarray([amd_scale(self._crystals[i]) for i in ix])[:, None]
        return a

    def candidates(self, q: Fingerprint | None, below: int | None = None) -> np.ndarray:
        """Indices (in the order added, below `below` if given) of the structures that may match q,
        nearest AMD (L-infinity) first."""
        if q is None or q.formula not in self._by_formula:
            return np.zeros(0, int)
        self.build([q.formula])
        ix, n, lengths, amds = self._buckets[q.formula]
        keep = (n == q.n) & np.all(q.minima < (1 + MATCHER["ltol"]) * (1 + 1e-6) * lengths, axis=1)
        if below is not None:
            keep &= ix < below
        d = np.abs(amds[keep] - q.amd).max(axis=1)
        return ix[keep][np.argsort(d, kind="stable")]

    def contains(self, c: Crystal) -> bool:
        return bool(self.contains_many([c])[0])

    def contains_many(self, crystals, workers: int | None = None) -> np.ndarray:
        """Whether each Crystal (or fingerprint, as in another index's `prints`) matches a structure
        of the index."""
        workers = workers or self.workers
        todo = [c for c in crystals if isinstance(c, Crystal)]
        done = iter(pmap(fingerprint, todo, workers if len(todo) >= POOL_MIN else 1, "fingerprints"))
        qs = [next(done) if isinstance(c, Crystal) else c for c in crystals]
        self.build({q.formula for q in qs if q is not None})  # only the buckets the queries touch
        cands = [self.candidates(q) for q in qs]
        same = sum(len(self._buckets[q.formula][0]) for q in qs if q is not None and q.formula in self._buckets)
        return self._any(qs, cands, same, workers)

    def earlier(self, workers: int | None = None) -> np.ndarray:
        """Whether each structure, in the order added, matches an earlier one (StructureMatcher.fit
        with the later one first)."""
        prints = self.prints
        cands = [self.candidates(q, below=i) for i, q in enumerate(prints)]
        same = sum(int((self._buckets[q.formula][0] < i).sum()) for i, q in enumerate(prints) if q is not None)
        return self._any(prints, cands, same, workers or self.workers)

    def _any(self, qs, cands, same: int, workers: int) -> np.ndarray:
        """Whether each query fingerprint matches one of its candidates (`same`: the pairs an
        unfiltered scan would try, for the log line)."""
        pairs = sum(len(c) for c in cands)
        refs = np.unique(np.concatenate([np.zeros(0, int), *cands]))
        where = {int(j): k for k, j in enumerate(refs)}
        todo = [i for i, c in enumerate(cands) if len(c)]
        tasks = [(qs[i].cell, [where[int(j)] for j in cands[i]]) for i in todo]
        if pairs > 1000:
            log.info("matching %d crystals against %d: %d candidate pairs of %d same-formula ones",
                     len(qs), len(self), pairs, same)  # fmt: skip
        hits = pmap(_fit_any, tasks, workers if pairs >= POOL_MIN else 1, "matching crystals", _set_refs,
                    ([self._fp[j].cell for j in refs],))  # fmt: skip
        out = np.zeros(len(qs), bool)
        out[todo] = np.asarray(hits, bool)
        return out
