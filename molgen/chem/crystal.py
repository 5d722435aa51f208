"""Crystals without a neural network: CDVAE-format CSV reading, CIF parsing, lattices, validity
and matching (pymatgen, SMACT, numpy). The parallel novelty index is `molgen.chem.match_index`.

Conventions: lattice matrices hold the lattice vectors as rows (Å); lattice parameters are
(a, b, c) in Å and (α, β, γ) in degrees; fractional coordinates are wrapped into [0, 1);
species are atomic numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import itertools
import math
import warnings
from collections import Counter

import numpy as np

# pymatgen StructureMatcher tolerances used for every match in molgen (REFERENCE.md 3)
MATCHER = dict(stol=0.5, ltol=0.3, angle_tol=10.0)
# (match_index.MatchIndex's prefilter relies on pymatgen's other defaults: primitive_cell, scale, no supercell)


class CrystalError(ValueError):
    """A record that cannot become a crystal; the message names the file, row and material."""


@dataclasses.dataclass
class Crystal:
    lattice: np.ndarray  # (3, 3) rows are lattice vectors, Å
    frac: np.ndarray  # (n, 3) in [0, 1)
    species: np.ndarray  # (n,) atomic numbers

    @property
    def params(self) -> np.ndarray:
        return lattice_params(self.lattice)


def read_csv(path: str) -> list[dict]:
    """Rows of a CDVAE-format CSV, plain or gzip-compressed (`.csv.gz`); the CIF fields are long."""
    csv.field_size_limit(1 << 30)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def parse_cif(text: str, where: str = "") -> Crystal:
    """CIF text -> Niggli-reduced Crystal; CrystalError naming `where` on failure."""
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure.from_str(text, fmt="cif")
        if not s.is_ordered:
            raise CrystalError("disordered (partial occupancy) sites")
        s = s.get_reduced_structure("niggli")
    except Exception as e:  # pymatgen raises ValueError, KeyError, IndexError... for bad CIF text
        raise CrystalError(f"{where}: CIF does not parse: {type(e).__name__}: {e}".strip(": ")) from e
    if len(s) == 0:
        raise CrystalError(f"{where}: CIF has no atoms")
    return from_structure(s)


def from_structure(s) -> Crystal:
    return Crystal(
        lattice=np.asarray(s.lattice.matrix, np.float64),
        frac=np.mod(np.asarray(s.frac_coords, np.float64), 1.0),
        species=np.asarray([site.specie.Z for site in s], np.int32),
    )


def to_structure(c: Crystal):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(c.lattice), [int(z) for z in c.species], c.frac, coords_are_cartesian=False)


def lattice_params(matrix: np.ndarray) -> np.ndarray:
    """(a, b, c, α, β, γ) of a row-vector lattice matrix."""
    m = np.asarray(matrix, np.float64)
    a, b, c = np.linalg.norm(m, axis=-1)

    def ang(u, v):
        return math.degrees(math.acos(np.clip(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))

    return np.asarray([a, b, c, ang(m[1], m[2]), ang(m[0], m[2]), ang(m[0], m[1])])


def lattice_matrix(params) -> np.ndarray:
    """Row-vector lattice matrix of (a, b, c, α, β, γ) in pymatgen's standard orientation;
    raises CrystalError where the angles admit no cell."""
    from pymatgen.core import Lattice

    a, b, c, al, be, ga = (float(x) for x in params)
    m = np.asarray(Lattice.from_parameters(a, b, c, al, be, ga).matrix)
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-8:
        raise CrystalError(f"lattice parameters {np.round(params, 3).tolist()} give no cell")
    return m


def volume(matrix) -> float:
    return float(abs(np.linalg.det(np.asarray(matrix, np.float64))))


# ----------------------------------------------------------------------------- validity


def min_distance(c: Crystal) -> float:
    """Shortest interatomic distance under periodic boundaries (inf for one atom alone in a
    large cell is not possible: an atom's own images count)."""
    s = to_structure(c)
    if len(s) == 1:
        return float(min(np.linalg.norm(c.lattice, axis=-1)))
    d = s.distance_matrix + np.diag(np.full(len(s), np.inf))
    own = float(min(np.linalg.norm(c.lattice, axis=-1)))  # an atom and its own image
    return float(min(d.min(), own))


def structure_valid(c: Crystal, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """Structural validity (CDVAE): every distance > 0.5 Å and volume > 0.1 Å^3."""
    if not (np.all(np.isfinite(c.lattice)) and np.all(np.isfinite(c.frac))):
        return False
    if volume(c.lattice) <= min_volume:
        return False
    return min_distance(c) > cutoff


MAX_OX_COMBOS = 50_000


def composition_valid(species) -> bool:
    """Compositional validity, CDVAE's definition with SMACT (pinned smact==3.2.0): a single
    element, or all metals (alloys), is valid; otherwise some assignment of SMACT oxidation
    states must be charge neutral for the gcd-reduced counts (threshold the largest count) and
    pass the Pauling electronegativity test. A composition with more than MAX_OX_COMBOS
    oxidation-state assignments counts as not valid without enumerating them (CDVAE enumerates
    all, which for the 10+ element compositions of an untrained model means billions; the most
    in the perov_5 and MP-20 subset data here is 5184, a 5-element compound)."""
    import smact
    from pymatgen.core.periodic_table import Element
    from smact.screening import pauling_test

    counts = Counter(int(z) for z in species)
    symbols = tuple(Element.from_Z(z).symbol for z in counts)
    if len(symbols) == 1:
        return True
    if all(s in smact.metals for s in symbols):
        return True
    n = np.asarray(list(counts.values()))
    n = n // np.gcd.reduce(n)
    space = smact.element_dictionary(symbols)
    elems = [space[s] for s in symbols]
    enegs = [e.pauling_eneg for e in elems]
    ox_combos = [e.oxidation_states or [] for e in elems]  # None for elements SMACT has no states for
    if np.prod([float(len(o)) for o in ox_combos]) > MAX_OX_COMBOS:
        return False
    stoichs = [(int(k),) for k in n]
    for ox in itertools.product(*ox_combos):
        ok, _ = smact.neutral_ratios(ox, stoichs=stoichs, threshold=int(n.max()))
        if ok:
            try:
                if pauling_test(ox, enegs):
                    return True
            except TypeError:  # an element without a Pauling electronegativity
                return True
    return False


def density(c: Crystal) -> float:
    """g/cm^3."""
    from pymatgen.core.periodic_table import Element

    mass = sum(float(Element.from_Z(int(z)).atomic_mass) for z in c.species)
    return mass / volume(c.lattice) * 1.66053906660


# ----------------------------------------------------------------------------- matching


def matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**MATCHER)


def match_rms(pred: Crystal, ref: Crystal, sm=None) -> float | None:
    """StructureMatcher RMS displacement normalised by (V/n)^(1/3), or None when the two do
    not match (CDVAE's reconstruction metric)."""
    sm = sm or matcher()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sm.get_rms_dist(to_structure(pred), to_structure(ref))
    except Exception:  # degenerate predicted cells make pymatgen raise
        return None
    return None if r is None else float(r[0])


def formula_key(species) -> str:
    from pymatgen.core import Composition

    return Composition(Counter(int(z) for z in species)).reduced_formula if len(species) else ""


AMD_K = 100  # neighbours in the AMD fingerprint (Chemeleon2's creativity reward uses k = 100 too)


def amd(c, k: int = AMD_K) -> np.ndarray:
    """Average minimum distance AMD_k (Widdowson & Kurlin 2022), Å: entry j is the distance from an
    atom to its (j+1)-th nearest neighbour in the periodic crystal (its own images count),
    averaged over the atoms of the cell. Every cell of a crystal, supercells included, gives the
    same vector. `c`: a Crystal or a pymatgen Structure."""
    s = to_structure(c) if isinstance(c, Crystal) else c
    n = len(s)
    if not s.volume > 1e-8:
        raise ValueError(f"a cell of volume {s.volume} has no AMD")
    r = 1.2 * (3 * (k + 1) * s.volume / (4 * math.pi * n)) ** (1 / 3)  # a ball holding ~k+1 atoms, and some
    while True:
        centre, _, _, d = s.get_neighbor_list(r)
        if np.bincount(centre, minlength=n).min() >= k:
            break
        r *= 1.5
    order = np.lexsort((d, centre))
    first = np.searchsorted(centre[order], np.arange(n))
    return d[order][first[:, None] + np.arange(k)].mean(0)


def amd_scale(c: Crystal) -> float:
    """(V/n)^(1/3) in Å: dividing an AMD by it compares shapes, not sizes (StructureMatcher, too,
    scales both structures to one volume before it compares them)."""
    return float((volume(c.lattice) / len(c.species)) ** (1 / 3))
