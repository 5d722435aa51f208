"""Enriched SMILES: a 3D molecule as text (REFERENCE.md section 1).

A unit reads `[SMILES]{smiles}[/SMILES][CONFORMER]{enriched}[/CONFORMER]`, where
`enriched` is the canonical isomeric SMILES with every heavy atom in brackets and
followed by `<x,y,z>` (Angstrom, truncated to 4 decimals).

Decision: an organic-subset atom that RDKit itself writes as a bare bracket atom
(`[C]`, `[N]`: radicals or unusual valence) would be indistinguishable from one we
bracketed, so `encode` rejects such molecules with `EnrichedError`.
"""

from __future__ import annotations

import math
import re

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem
from rdkit.Geometry import Point3D

SMILES_TAG, SMILES_END = "[SMILES]", "[/SMILES]"
CONF_TAG, CONF_END = "[CONFORMER]", "[/CONFORMER]"
ORGANIC = ("Cl", "Br", "B", "C", "N", "O", "P", "S", "F", "I", "b", "c", "n", "o", "p", "s")

# One SMILES token: a bracket atom, an organic-subset atom, or any other character.
SMILES_TOKEN_RE = re.compile(r"(\[[^\]]+\]|Cl|Br|%\d\d|[BCNOPSFIbcnops]|.)")
_ATOM_RE = re.compile(r"^(\[[^\]]+\]|Cl|Br|[BCNOPSFIbcnops])$")
_ENRICHED_ATOM_RE = re.compile(r"(\[[^\]]+\])<(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)>")
_BARE = {f"[{a}]": a for a in ORGANIC}


class EnrichedError(ValueError):
    """A molecule or text that cannot be encoded or decoded."""


def fmt_coord(x: float) -> str:
    """Truncate (not round) to 4 decimals; `2.0` -> '2.0', `-1.23456` -> '-1.2345'."""
    n = math.trunc(round(float(x) * 1e4, 3))  # the round() absorbs float noise (2.7704 -> 27703.9999)
    return repr(n / 1e4) if n != 0 else "0.0"


def smiles_tokens(smiles: str) -> list[str]:
    return SMILES_TOKEN_RE.findall(smiles)


def is_atom_token(tok: str) -> bool:
    return bool(_ATOM_RE.match(tok)) and tok not in (SMILES_TAG, SMILES_END, CONF_TAG, CONF_END)


def encode(mol: Chem.Mol, conf_id: int = -1) -> tuple[str, str]:
    """Return (canonical isomeric SMILES, enriched string) for a molecule with a conformer."""
    if mol.GetNumConformers() == 0:
        raise EnrichedError("molecule has no conformer")
    mol = Chem.RemoveHs(mol)
    smiles = Chem.MolToSmiles(mol, isomericSmiles=True, canonical=True)
    order = [int(i) for i in mol.GetProp("_smilesAtomOutputOrder").strip("[]").split(",") if i]
    pos = mol.GetConformer(conf_id).GetPositions()
    out, k = [], 0
    for tok in smiles_tokens(smiles):
        if not is_atom_token(tok):
            out.append(tok)
            continue
        if tok in _BARE:
            raise EnrichedError(f"bare bracket atom {tok} in {smiles!r} is ambiguous in enriched SMILES")
        atom = tok if tok.startswith("[") else f"[{tok}]"
        x, y, z = pos[order[k]]
        out.append(f"{atom}<{fmt_coord(x)},{fmt_coord(y)},{fmt_coord(z)}>")
        k += 1
    if k != mol.GetNumAtoms():
        raise EnrichedError(f"matched {k} atom tokens for {mol.GetNumAtoms()} atoms in {smiles!r}")
    return smiles, "".join(out)


def strip_coords(enriched: str) -> str:
    """The plain SMILES of an enriched string (coordinates and added brackets removed)."""
    text = re.sub(r"<[^>]*>", "", enriched)
    return "".join(_BARE.get(t, t) for t in smiles_tokens(text))


def decode(enriched: str) -> Chem.Mol:
    """Rebuild an RDKit molecule (heavy atoms) with the conformer written in `enriched`."""
    coords = [tuple(float(v) for v in m.groups()[1:]) for m in _ENRICHED_ATOM_RE.finditer(enriched)]
    plain = strip_coords(enriched)
    n_atoms_text = sum(is_atom_token(t) for t in smiles_tokens(plain))
    if n_atoms_text != len(coords):
        raise EnrichedError(f"{n_atoms_text} atoms but {len(coords)} coordinate triples in {enriched[:80]!r}")
    mol = Chem.MolFromSmiles(plain, sanitize=True)
    if mol is None:
        raise EnrichedError(f"RDKit cannot parse the decoded SMILES {plain!r}")
    if mol.GetNumAtoms() != len(coords):
        raise EnrichedError(f"decoded {mol.GetNumAtoms()} atoms but {len(coords)} coordinates")
    conf = Chem.Conformer(mol.GetNumAtoms())
    for i, (x, y, z) in enumerate(coords):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    conf.Set3D(True)
    mol.AddConformer(conf, assignId=True)
    return mol


def unit_text(smiles: str, enriched: str) -> str:
    return f"{SMILES_TAG}{smiles}{SMILES_END}{CONF_TAG}{enriched}{CONF_END}"


def prompt_text(smiles: str) -> str:
    return f"{SMILES_TAG}{smiles}{SMILES_END}{CONF_TAG}"


def split_unit(text: str) -> tuple[str, str]:
    """(prompt SMILES, enriched) of a unit text; raises EnrichedError when tags are missing."""
    m = re.fullmatch(
        re.escape(SMILES_TAG) + r"(.*?)" + re.escape(SMILES_END) + re.escape(CONF_TAG) + r"(.*?)" + re.escape(CONF_END),
        text.strip(),
        flags=re.S,
    )
    if m is None:
        raise EnrichedError(f"missing tags in {text[:80]!r}")
    return m.group(1), m.group(2)


def canonical(smiles_or_mol) -> str:
    mol = Chem.MolFromSmiles(smiles_or_mol) if isinstance(smiles_or_mol, str) else smiles_or_mol
    if mol is None:
        raise EnrichedError(f"RDKit cannot parse SMILES {smiles_or_mol!r}")
    return Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=True, canonical=True)


def same_graph(a, b) -> bool:
    """True when two molecules (or SMILES) have the same canonical isomeric SMILES."""
    try:
        return canonical(a) == canonical(b)
    except EnrichedError:
        return False


def embed_conformers(smiles: str, n: int, seed: int, mmff: bool = True) -> Chem.Mol:
    """ETKDGv3 conformers (+ MMFF relaxation) for one SMILES; raises EnrichedError on failure."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise EnrichedError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2**31)
    params.numThreads = 1
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n, params=params))
    if not ids:
        raise EnrichedError(f"ETKDG failed to embed {smiles!r}")
    if mmff and AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=500)
    mol = Chem.RemoveHs(mol)
    if not all(np.isfinite(mol.GetConformer(i).GetPositions()).all() for i in ids):
        raise EnrichedError(f"non-finite coordinates for {smiles!r}")
    return mol


def embed_job(job):
    """Pool worker: (split, mol_index, smiles, n_conf, seed, mmff) -> (job, units | error string).

    Lives here (not in the data module) so spawned workers import only RDKit."""
    split, idx, smi, n_conf, seed, mmff = job
    try:
        mol = embed_conformers(smi, n_conf, seed=seed, mmff=mmff)
        out = []
        for k, conf in enumerate(mol.GetConformers()):
            can, enr = encode(mol, conf.GetId())
            out.append({"smiles": can, "enriched": enr, "mol_index": idx, "conf_index": k})
        return job, out
    except Exception as e:  # one bad molecule never stops the build
        return job, f"{type(e).__name__}: {e}"
