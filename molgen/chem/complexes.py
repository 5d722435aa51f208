"""Biomolecular complexes from PDB files, as ATOMICA sees them: molecules made of blocks.

A block is a residue (20 amino acids), a nucleotide (4 DNA, 4 RNA), an ion (one atom), or a
fragment of a small molecule: the ligand's heavy atoms are covered greedily, largest first, by
the 300 principal-subgraph fragments of ATOMICA's vocabulary (`third_party/data/complexes/
atomica_vocab`), and an atom that no fragment covers is a block of its own, typed by its element.
Decisions (ATOMICA reads bond orders from the chemical component dictionary; a PDB file carries
none): fragments are matched on elements and connectivity only, with the connectivity taken from
the coordinates (RDKit's `DetermineConnectivity`), so a fragment matches whatever its bond orders.

Reading (gemmi): the first model only, hydrogens, waters and alternative conformations
dropped (the first altloc is kept). Polymer residues are protein or nucleic acid by gemmi's
residue table (a modified amino acid becomes its parent; one with no parent is UNK); a
non-polymer residue is an ion (one metal atom), a crystallisation additive (`ADDITIVES`,
skipped) or a ligand (at least `MIN_LIGAND_ATOMS` heavy atoms). Glycans (branched entities) are
skipped. Every failure raises `ComplexError` naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import pathlib

import numpy as np

AA = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
      "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")  # fmt: skip
NT = ("DA", "DC", "DG", "DT", "A", "C", "G", "U")
SPECIAL = ("PAD", "MASK", "GLB", "UNK")
N_ELEMENTS = 118
BACKBONE = ("N", "CA", "C", "O")
# Block vocabulary: SPECIAL, AA, NT, one single-atom block per element (Z = 1..118), fragments.
PAD, MASK, GLB, UNK = range(4)
AA_START = len(SPECIAL)
NT_START = AA_START + len(AA)
ELEMENT_START = NT_START + len(NT)
FRAGMENT_START = ELEMENT_START + N_ELEMENTS
# Atom element vocabulary: 0 pad, Z = 1..118, then the mask atom and the global atom.
MASK_ATOM, GLOBAL_ATOM = N_ELEMENTS + 1, N_ELEMENTS + 2
N_ATOM_TYPES = N_ELEMENTS + 3
MIN_LIGAND_ATOMS = 5
# Crystallisation additives, buffers and cryoprotectants, never treated as a binding partner.
ADDITIVES = frozenset(
    "SO4 PO4 GOL EDO PEG PGE PG4 1PE P6G ACT ACE DMS FMT MPD MRD TRS BME EPE MES IMD NO3 SCN IPA EOH "
    "CIT TAR MLI NH4 CL BR IOD FLC BU3 PE4 PEU 2PE 12P 15P DIO MOH ETF BTB TLA SIN AZI CO3 NHE".split()
)
VOCAB_PATH = pathlib.Path(__file__).resolve().parents[2] / "third_party/data/complexes/atomica_vocab/ps_vocab_300.txt"


class ComplexError(ValueError):
    """A structure that cannot be read, or an interface that cannot be made; the message names
    the file (and chain or residue) and the reason."""


@dataclasses.dataclass
class Block:
    type: int  # block vocabulary index
    elements: np.ndarray  # (n,) atomic numbers
    names: tuple  # atom names (PDB), "" for ligand atoms
    x: np.ndarray  # (n, 3) Å
    label: str  # "A:123 ALA", "B:401 ATP frag 3", for messages and reports


@dataclasses.dataclass
class Molecule:
    kind: str  # protein, nucleic, ligand, ion
    name: str  # chain id for polymers, "B:401 ATP" for a ligand or ion
    blocks: list
    bonds: np.ndarray  # (E, 2) covalent bonds, atom indices into the concatenated blocks

    @property
    def x(self) -> np.ndarray:
        return np.concatenate([b.x for b in self.blocks])

    @property
    def residues(self) -> int:
        return len(self.blocks)


def block_name(t: int) -> str:
    if t < AA_START:
        return SPECIAL[t]
    if t < NT_START:
        return AA[t - AA_START]
    if t < ELEMENT_START:
        return NT[t - NT_START]
    if t < FRAGMENT_START:
        import gemmi

        return gemmi.Element(t - ELEMENT_START + 1).name
    return fragments()[t - FRAGMENT_START][0]


def n_block_types() -> int:
    return FRAGMENT_START + len(fragments())


@functools.lru_cache(maxsize=1)
def fragments(path: str = str(VOCAB_PATH)) -> list:
    """[(smiles, query mol)] of the principal-subgraph vocabulary, in file order (largest first):
    element-only atoms and any-order bonds, so a fragment matches on elements and connectivity
    (several fragments are subgraphs that RDKit cannot sanitise; they are read unsanitised)."""
    from rdkit import Chem
    from rdkit.Chem import rdqueries

    out = []
    lines = pathlib.Path(path).read_text().splitlines()[1:]  # line 0: the tokenizer's JSON header
    for i, line in enumerate(lines):
        smi = line.split("\t")[0]
        m = Chem.MolFromSmiles(smi, sanitize=False)
        if m is None:
            raise ComplexError(f"{path}: line {i + 2}: fragment {smi!r} does not parse")
        q = Chem.RWMol(m)
        for a in m.GetAtoms():
            q.ReplaceAtom(a.GetIdx(), rdqueries.AtomNumEqualsQueryAtom(a.GetAtomicNum()))
        for b in m.GetBonds():
            q.ReplaceBond(b.GetIdx(), Chem.BondFromSmarts("~"))
        out.append((smi, q.GetMol()))
    return out


def _connectivity(elements, x):
    """RDKit molecule (no bond orders) with bonds from the coordinates."""
    import gemmi
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    lines = [f"{gemmi.Element(int(z)).name} {p[0]:.4f} {p[1]:.4f} {p[2]:.4f}" for z, p in zip(elements, x, strict=True)]
    mol = Chem.MolFromXYZBlock(f"{len(lines)}\n\n" + "\n".join(lines))
    rdDetermineBonds.DetermineConnectivity(mol)
    return mol


def fragment(elements, x) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    """(atom indices of each block, block types, bonds (E, 2)) of one small molecule: the
    vocabulary's fragments matched greedily in file order on atoms not yet covered, then one
    element block per atom left."""
    mol = _connectivity(elements, x)
    bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], np.int32).reshape(-1, 2)
    free = np.ones(len(elements), bool)
    groups, types = [], []
    for k, (_, q) in enumerate(fragments()):
        if q.GetNumAtoms() > free.sum():
            continue
        if q.GetNumAtoms() == 1:  # single atoms are the element blocks below
            break
        for match in mol.GetSubstructMatches(q, uniquify=True, maxMatches=1000):
            idx = np.asarray(match)
            if free[idx].all():
                free[idx] = False
                groups.append(np.sort(idx))
                types.append(FRAGMENT_START + k)
    for i in np.flatnonzero(free):
        groups.append(np.array([i]))
        types.append(ELEMENT_START + int(elements[i]) - 1)
    return groups, types, bonds


def residue_bonds(elements, x) -> np.ndarray:
    """Covalent bonds inside one residue or nucleotide, by distance (< 1.9 Å; < 2.2 Å with S or P)."""
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    heavy = np.isin(elements, (15, 16))
    cut = np.where(heavy[:, None] | heavy[None], 2.2, 1.9)
    i, j = np.nonzero(np.triu((d < cut) & (d > 0.1), 1))
    return np.stack([i, j], 1).astype(np.int32)


def _residue_atoms(res, where: str):
    elements = np.array([a.element.atomic_number for a in res], np.int32)
    x = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in res], np.float64)
    if not np.isfinite(x).all():
        raise ComplexError(f"{where}: residue {res.name} {res.seqid} has non-finite coordinates")
    return elements, tuple(a.name for a in res), x


ONE_LETTER = dict(zip("ARNDCQEGHILKMFPSTWYV", AA, strict=True))


def _polymer_type(res) -> tuple[str, int] | None:
    """(protein or nucleic, block type) of a polymer residue; a modified amino acid becomes its
    parent (MSE: MET), one without a standard parent is UNK; None for anything else."""
    import gemmi

    if res.name in AA:
        return "protein", AA_START + AA.index(res.name)
    if res.name in NT:
        return "nucleic", NT_START + NT.index(res.name)
    info = gemmi.find_tabulated_residue(res.name)
    if info is None:
        return None
    if info.is_amino_acid():
        parent = ONE_LETTER.get(info.one_letter_code.strip().upper())
        return "protein", AA_START + AA.index(parent) if parent else UNK
    if info.is_nucleic_acid():
        return "nucleic", UNK
    return None


def _clean_pdb(text: str) -> tuple[str, int]:
    """PDB text with the element and charge columns (77-80) of ATOM/HETATM lines removed where
    they hold something else (Docking Benchmark files keep a serial number there), so the element
    comes from the atom name; and the number of lines changed."""
    out, fixed = [], 0
    for line in text.splitlines():
        if line.startswith(("ATOM", "HETATM")) and len(line) > 76:
            el, ch = line[76:78].strip(), line[78:80].strip()
            if not (el.isalpha() or not el) or not (not ch or (len(ch) == 2 and ch[0].isdigit() and ch[1] in "+-")):
                line, fixed = line[:76], fixed + 1
        out.append(line)
    return "\n".join(out) + "\n", fixed


def read(path: str) -> dict:
    """{"protein": {chain: Molecule}, "nucleic": {chain: Molecule}, "ligand": [Molecule],
    "ion": [Molecule]} of the first model of a PDB (or mmCIF) file, gzip or not."""
    import gemmi

    where = str(path)
    try:
        if ".cif" in pathlib.Path(where).name.lower():
            st = gemmi.read_structure(where)
        else:
            opener = gzip.open if where.endswith(".gz") else open
            with opener(where, "rt", errors="replace") as f:
                st = gemmi.read_pdb_string(_clean_pdb(f.read())[0])
    except Exception as e:  # gemmi raises RuntimeError/ValueError with its own message
        raise ComplexError(f"{where}: not a readable structure ({e})") from e
    if len(st) == 0:
        raise ComplexError(f"{where}: no model in the file")
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()
    st.remove_alternative_conformations()
    out = {"protein": {}, "nucleic": {}, "ligand": [], "ion": []}
    poly: dict = {}
    for chain in st[0]:
        for res in chain:
            if len(res) == 0:
                continue
            elements, names, x = _residue_atoms(res, where)
            label = f"{chain.name}:{res.seqid.num}{res.seqid.icode.strip()} {res.name}"
            if res.entity_type == gemmi.EntityType.Polymer:
                kt = _polymer_type(res)
                if kt is None:
                    continue
                poly.setdefault((kt[0], chain.name), []).append(Block(kt[1], elements, names, x, label))
            elif res.entity_type == gemmi.EntityType.NonPolymer and res.name not in ADDITIVES:
                if len(res) == 1 and gemmi.Element(int(elements[0])).is_metal:
                    b = Block(ELEMENT_START + int(elements[0]) - 1, elements, names, x, label)
                    out["ion"].append(Molecule("ion", label, [b], np.zeros((0, 2), np.int32)))
                elif len(res) >= MIN_LIGAND_ATOMS:
                    out["ligand"].append(_ligand(elements, x, label))
    for (kind, ch), blocks in poly.items():
        bonds, n = [], 0
        for b in blocks:
            bonds.append(residue_bonds(b.elements, b.x) + n)
            n += len(b.elements)
        out[kind][ch] = Molecule(kind, ch, blocks, np.concatenate(bonds).astype(np.int32))
    if not any(out[k] for k in out):
        raise ComplexError(f"{where}: no atoms of a protein, nucleic acid, ligand or ion")
    return out


def _ligand(elements, x, label: str) -> Molecule:
    groups, types, bonds = fragment(elements, x)
    order = np.concatenate(groups)
    new = np.empty(len(order), np.int64)
    new[order] = np.arange(len(order))
    blocks = [Block(t, elements[g], ("",) * len(g), x[g], f"{label} frag {i}")
              for i, (g, t) in enumerate(zip(groups, types, strict=True))]  # fmt: skip
    return Molecule("ligand", label, blocks, new[bonds].astype(np.int32).reshape(-1, 2))


def merge(mols: list, kind: str, name: str) -> Molecule:
    """Several molecules as one segment (e.g. the chains of one side of a protein complex)."""
    blocks, bonds, n = [], [], 0
    for m in mols:
        blocks += m.blocks
        bonds.append(m.bonds + n)
        n += sum(len(b.elements) for b in m.blocks)
    return Molecule(kind, name, blocks, np.concatenate(bonds).astype(np.int32) if bonds else np.zeros((0, 2), np.int32))


def block_min_distances(a: Molecule, b: Molecule) -> tuple[np.ndarray, np.ndarray]:
    """For each block of `a`, the smallest distance from any of its atoms to any atom of `b`,
    and the same for `b` against `a` (k-d tree, exact)."""
    from scipy.spatial import cKDTree

    xa, xb = a.x, b.x
    return block_min(a, cKDTree(xb).query(xa)[0]), block_min(b, cKDTree(xa).query(xb)[0])


def block_min(mol: Molecule, per_atom: np.ndarray) -> np.ndarray:
    """The smallest of a per-atom quantity within each block of `mol`."""
    sizes = [len(bl.elements) for bl in mol.blocks]
    return np.minimum.reduceat(per_atom, np.cumsum([0] + sizes[:-1])) if sizes else np.zeros(0)


# Theoretical maximum accessible surface area per residue (Å^2), Tien et al., PLoS ONE 8, e80635 (2013).
MAX_ASA = {"ALA": 129.0, "ARG": 274.0, "ASN": 195.0, "ASP": 193.0, "CYS": 167.0, "GLN": 225.0, "GLU": 223.0,
           "GLY": 104.0, "HIS": 224.0, "ILE": 197.0, "LEU": 201.0, "LYS": 236.0, "MET": 224.0, "PHE": 240.0,
           "PRO": 159.0, "SER": 155.0, "THR": 172.0, "TRP": 285.0, "TYR": 263.0, "VAL": 174.0}  # fmt: skip


def relative_sasa(mol: Molecule) -> np.ndarray:
    """Relative solvent accessibility of each block (residue) of a protein on its own:
    Biopython's Shrake-Rupley SASA over the residue's heavy atoms, divided by its maximum (Tien
    et al. 2013; 200 Å^2 for UNK), clipped to [0, 1.5]."""
    import io

    import gemmi
    from Bio.PDB import PDBParser
    from Bio.PDB.SASA import ShrakeRupley

    lines, serial = [], 1
    for r, b in enumerate(mol.blocks):
        name = block_name(b.type) if AA_START <= b.type < NT_START else "UNK"
        for z, nm, p in zip(b.elements, b.names, b.x, strict=True):
            el = gemmi.Element(int(z)).name.upper()
            atom = nm if len(nm) >= 4 else f" {nm:<3}"
            lines.append(f"ATOM  {serial % 100000:5d} {atom:4s} {name:3s} A{(r + 1) % 10000:4d}    "
                         f"{p[0]:8.3f}{p[1]:8.3f}{p[2]:8.3f}  1.00  0.00          {el:>2s}")  # fmt: skip
            serial += 1
    st = PDBParser(QUIET=True).get_structure("p", io.StringIO("\n".join(lines) + "\nEND\n"))
    ShrakeRupley().compute(st[0], level="R")
    residues = list(st[0].get_residues())
    if len(residues) != len(mol.blocks):  # residue numbers wrap at 10000
        raise ComplexError(f"{mol.name}: {len(mol.blocks)} residues, Biopython read {len(residues)}")
    return np.array([min(r.sasa / MAX_ASA.get(r.get_resname(), 200.0), 1.5) for r in residues], np.float32)


def contact_labels(mol: Molecule, partner_x: np.ndarray, cutoff: float = 5.0) -> np.ndarray:
    """1 for each block with a heavy atom within `cutoff` Å of any partner atom."""
    from scipy.spatial import cKDTree

    return (block_min(mol, cKDTree(partner_x).query(mol.x)[0]) < cutoff).astype(np.int32)
