"""Sample metrics for generated crystals (host side; pymatgen, SMACT, scipy, optional CHGNet).

Definitions (all rates are fractions of the samples drawn unless said otherwise):
- structural validity: every interatomic distance > 0.5 Å and volume > 0.1 Å^3 (CDVAE);
- compositional validity: `chem.crystal.composition_valid` (CDVAE's SMACT test, smact==3.2.0);
- valid: both;
- uniqueness: of the valid samples, the fraction not matching an earlier valid sample
  (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10);
- novelty: of the unique valid samples, the fraction matching no training crystal;
- Wasserstein distances of density (g/cm^3) and of the number of distinct elements between
  the valid samples and the test set;
- E_hull proxy: CHGNet (0.4.2, weights in the wheel) single-point energies per atom, against a
  pymatgen PhaseDiagram (per chemical system) of CHGNet energies of the training crystals
  plus elemental references (see `elemental_references`); S.U.N. = valid, unique, novel and
  E_hull <= 0; MSUN the same with E_hull <= 0.1 eV/atom. Samples that are structurally
  invalid, denser than 4 Å^3/atom, or whose energy or reference fails count as not stable.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np

from molgen.chem import crystal as xtal
from molgen.chem import match_index

log = logging.getLogger("molgen")


def validity(crystals) -> tuple[np.ndarray, np.ndarray]:
    struct = np.asarray([c is not None and xtal.structure_valid(c) for c in crystals], bool)
    comp = np.asarray([c is not None and xtal.composition_valid(c.species) for c in crystals], bool)
    return struct, comp


def unique_novel(
    crystals, valid, train_index: match_index.MatchIndex, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(unique, novel) boolean arrays: a valid crystal is unique when it matches no earlier valid
    one, and a unique one is novel when it matches no training crystal (`match_index.MatchIndex`, which
    prefilters the pairs and runs the matcher over `workers` processes, default all cores)."""
    idx = np.flatnonzero(valid)
    unique = np.zeros(len(crystals), bool)
    novel = np.zeros(len(crystals), bool)
    if len(idx):
        seen = match_index.MatchIndex([crystals[i] for i in idx], workers)
        first = ~seen.earlier()
        unique[idx] = first
        novel[idx[first]] = ~train_index.contains_many([seen.prints[i] for i in np.flatnonzero(first)], workers)
    return unique, novel


def wasserstein(samples, reference) -> dict:
    from scipy.stats import wasserstein_distance

    def props(cs):
        return (np.asarray([xtal.density(c) for c in cs]), np.asarray([len(set(c.species.tolist())) for c in cs]))

    if not samples:
        return {"wdist_density": float("nan"), "wdist_n_elements": float("nan")}
    ds, es = props(samples)
    dr, er = props(reference)
    return {
        "wdist_density": float(wasserstein_distance(ds, dr)),
        "wdist_n_elements": float(wasserstein_distance(es, er)),
    }


# ----------------------------------------------------------------------------- CHGNet hull


def _chgnet():
    try:
        from chgnet.model import CHGNet
    except ImportError as e:
        raise ImportError("the E_hull proxy needs CHGNet: pip install -e '.[chgnet]' (torch==2.13.0 CPU)") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CHGNet.load(verbose=False)


def chgnet_energies(crystals, model=None, batch: int = 64) -> np.ndarray:
    """Energy per atom (eV) of each crystal (NaN where CHGNet fails on it)."""
    model = model or _chgnet()
    out = np.full(len(crystals), np.nan)
    structs = [(i, xtal.to_structure(c)) for i, c in enumerate(crystals) if c is not None]
    for s in range(0, len(structs), batch):
        chunk = structs[s : s + batch]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                preds = model.predict_structure([x for _, x in chunk], task="e", batch_size=batch)
            for (i, _), p in zip(chunk, preds, strict=True):
                out[i] = float(p["e"])
        except Exception:  # one bad structure spoils the batch: fall back to one at a time
            for i, x in chunk:
                try:
                    out[i] = float(model.predict_structure(x, task="e")["e"])
                except Exception:
                    pass
    return out


PROTOTYPES = ("fcc", "bcc", "hcp", "diamond", "dimer")
MIN_VOLUME_PER_ATOM = 4.0  # Å^3; diamond has 5.7, the densest elemental solids about 5


def _prototype(kind: str, z: int, d: float) -> xtal.Crystal:
    """An elemental crystal with nearest-neighbour distance d (Å)."""
    if kind == "fcc":
        a = d * np.sqrt(2)
        return xtal.Crystal(
            0.5 * a * np.asarray([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float), np.zeros((1, 3)), np.asarray([z])
        )
    if kind == "bcc":
        a = 2 * d / np.sqrt(3)
        return xtal.Crystal(
            0.5 * a * np.asarray([[-1, 1, 1], [1, -1, 1], [1, 1, -1]], float), np.zeros((1, 3)), np.asarray([z])
        )
    if kind == "sc":
        return xtal.Crystal(d * np.eye(3), np.zeros((1, 3)), np.asarray([z]))
    if kind == "hcp":
        lat = xtal.lattice_matrix([d, d, d * np.sqrt(8 / 3), 90, 90, 120])
        return xtal.Crystal(lat, np.asarray([[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]), np.asarray([z, z]))
    if kind == "diamond":
        a = 4 * d / np.sqrt(3)
        lat = 0.5 * a * np.asarray([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float)
        return xtal.Crystal(lat, np.asarray([[0, 0, 0], [0.25, 0.25, 0.25]]), np.asarray([z, z]))
    if kind == "dimer":  # a diatomic molecule in a 10 Å box (O2, N2, halogens...)
        return xtal.Crystal(10.0 * np.eye(3), np.asarray([[0, 0, 0], [d / 10.0, 0, 0]]), np.asarray([z, z]))
    raise ValueError(kind)


def elemental_references(elements, model=None) -> dict[int, float]:
    """Lowest CHGNet energy per atom of each element over simple prototypes (fcc, bcc, hcp,
    diamond, and a dimer in a 10 Å box), each at nearest-neighbour distances scanned around
    twice the element's atomic radius. No MP elemental structures are on this machine; this is
    the stated stand-in."""
    from pymatgen.core.periodic_table import Element

    model = model or _chgnet()
    cands, owners = [], []
    for z in elements:
        r = Element.from_Z(int(z)).atomic_radius or 1.0
        # solids are scanned from 1.5 Å nearest-neighbour distance up: denser cells (H, F by
        # radius) give CHGNet thousands of neighbours per atom (11 GB and minutes for H alone)
        solid_d = np.maximum(2 * float(r) * np.asarray([0.9, 1.0, 1.1, 1.2]), 1.5 * np.asarray([1.0, 1.1, 1.2, 1.3]))
        for kind in PROTOTYPES:
            for d in [0.9, 1.2, 1.5, 2.0, 2.5] if kind == "dimer" else solid_d:
                cands.append(_prototype(kind, int(z), float(d)))
                owners.append(int(z))
    e = chgnet_energies(cands, model, batch=4)
    out = {}
    for z in set(owners):
        vals = e[[i for i, o in enumerate(owners) if o == z]]
        out[z] = float(np.nanmin(vals))
    return out


class Hull:
    """E_hull against CHGNet energies of the training crystals plus elemental references.

    Lazy and per chemical system: for each sample's element set, only the training crystals
    whose elements lie inside it matter, so only those get CHGNet energies (cached by training
    index in `cache`, written atomically), and one pymatgen PhaseDiagram is built per chemical
    system (a single diagram over ~60 elements would be intractable)."""

    def __init__(self, train_crystals, model=None, cache: str = ""):
        self.train = list(train_crystals)
        self.systems = [frozenset(int(z) for z in c.species) for c in self.train]
        self.model, self.cache = model, cache
        saved = json.loads(open(cache).read()) if cache and os.path.exists(cache) else {}
        if saved.get("n_train") not in (None, len(self.train)):
            raise ValueError(f"{cache}: hull cache is for {saved['n_train']} training crystals, not {len(self.train)}")
        self.energies = {int(k): v for k, v in saved.get("train", {}).items()}
        self.refs = {int(k): v for k, v in saved.get("refs", {}).items()}
        self.diagrams: dict = {}

    def _model(self):
        if self.model is None:
            self.model = _chgnet()
        return self.model

    def _fill(self, systems) -> None:
        """CHGNet energies of the training crystals and elements inside any of `systems`."""
        need = [j for j, sj in enumerate(self.systems) if j not in self.energies and any(sj <= s for s in systems)]
        elements = sorted({z for s in systems for z in s} - set(self.refs))
        if need:
            log.info("CHGNet energies of %d training crystals for the hull", len(need))
            e = chgnet_energies([self.train[j] for j in need], self._model())
            self.energies.update({j: (float(x) if np.isfinite(x) else None) for j, x in zip(need, e, strict=True)})
            _save(self.cache, {"n_train": len(self.train), "train": self.energies, "refs": self.refs})
        if elements:
            log.info("CHGNet elemental references for %d elements", len(elements))
            self.refs.update(elemental_references(elements, self._model()))
            _save(self.cache, {"n_train": len(self.train), "train": self.energies, "refs": self.refs})

    def diagram(self, system: frozenset):
        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

        if system not in self.diagrams:
            entries = [PDEntry(_comp(self.train[j].species), e * len(self.train[j].species))
                       for j, e in self.energies.items() if e is not None and self.systems[j] <= system]  # fmt: skip
            entries += [PDEntry(_comp([z]), self.refs[z]) for z in system]
            self.diagrams[system] = PhaseDiagram(entries)
        return self.diagrams[system]

    def e_above_hull(self, crystals) -> np.ndarray:
        from pymatgen.analysis.phase_diagram import PDEntry

        # CHGNet only sees physically possible cells: a structurally invalid or ultra-dense sample
        # (< MIN_VOLUME_PER_ATOM) would give it thousands of neighbours per atom
        crystals = [c if c is not None and xtal.structure_valid(c)
                    and xtal.volume(c.lattice) / len(c.species) >= MIN_VOLUME_PER_ATOM else None
                    for c in crystals]  # fmt: skip
        systems = {frozenset(int(z) for z in c.species) for c in crystals if c is not None}
        self._fill(systems)
        e = chgnet_energies(crystals, self._model())
        out = np.full(len(crystals), np.nan)
        for i, c in enumerate(crystals):
            if c is None or not np.isfinite(e[i]):
                continue
            system = frozenset(int(z) for z in c.species)
            if not all(np.isfinite(self.refs.get(z, np.nan)) for z in system):
                continue
            try:
                entry = PDEntry(_comp(c.species), float(e[i]) * len(c.species))
                out[i] = float(self.diagram(system).get_e_above_hull(entry, allow_negative=True))
            except Exception:  # pymatgen fails on degenerate diagrams; the sample counts as not stable
                pass
        return out


def _save(path: str, obj) -> None:
    """Write the hull cache atomically (a killed run leaves the previous file intact)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _sym(z: int) -> str:
    from pymatgen.core.periodic_table import Element

    return Element.from_Z(int(z)).symbol


def _comp(species):
    from collections import Counter

    from pymatgen.core import Composition

    return Composition({_sym(z): n for z, n in Counter(int(x) for x in species).items()})


def evaluate(samples, train_crystals, test_crystals, hull: Hull | None = None) -> tuple[dict, dict]:
    """(rates and distances, per-sample arrays) for a list of sampled crystals (None entries:
    undecodable)."""
    n = len(samples)
    struct, comp = validity(samples)
    valid = struct & comp
    unique, novel = unique_novel(samples, valid, match_index.MatchIndex(train_crystals))
    out = {
        "n_samples": n,
        "struct_valid": float(struct.mean()),
        "comp_valid": float(comp.mean()),
        "valid": float(valid.mean()),
        "unique": float(unique.sum() / max(valid.sum(), 1)),
        "novel": float(novel.sum() / max(unique.sum(), 1)),
        **wasserstein([c for c, v in zip(samples, valid, strict=True) if v], test_crystals),
    }
    per = {"struct_valid": struct, "comp_valid": comp, "unique": unique, "novel": novel}
    if hull is not None:
        eh = hull.e_above_hull(samples)
        per["e_above_hull"] = eh
        fin = np.isfinite(eh)
        out["e_hull_evaluated"] = float(fin.mean())
        out["e_hull_median"] = float(np.median(eh[fin])) if fin.any() else float("nan")
        out["stable"] = float((fin & (np.nan_to_num(eh, nan=9.0) <= 0.0)).mean())
        out["sun"] = float((unique & novel & (np.nan_to_num(eh, nan=9.0) <= 0.0)).mean())
        out["msun"] = float((unique & novel & (np.nan_to_num(eh, nan=9.0) <= 0.1)).mean())
    return out, per
