"""Enriched SMILES: a 3D molecule as text (REFERENCE.md section 1).

A unit reads `[SMILES]{smiles}[/SMILES][CONFORMER]{enriched}[/CONFORMER]`, where
`enriched` is the canonical isomeric SMILES with every heavy atom in brackets and
followed by `<x,y,z>` (Angstrom, truncated to 4 decimals). `reframe` rewrites the coordinates
in the principal-axes frame and/or with fewer decimals (the LM's `data.frame` / `data.decimals`).

Decision: an organic-subset atom that RDKit itself writes as a bare bracket atom
(`[C]`, `[N]`: radicals or unusual valence) would be indistinguishable from one we
bracketed, so `encode` rejects such molecules with `EnrichedError`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rdkit import Chem

# RDKit is imported inside the functions that use it: the tokenizer (and so the LM model presets
# and sampler) needs only the string helpers here, and runs where RDKit is not installed.

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


FRAMES = ("raw", "principal")
DECIMALS = (1, 2, 3, 4)


def fmt_coord(x: float, decimals: int = 4) -> str:
    """Truncate (not round) to `decimals` (1-4) decimals; `2.0` -> '2.0', `-1.23456` -> '-1.2345' (4),
    '-1.23' (2), '-1.2' (1); a value that truncates to zero is '0.0'."""
    scale = 10**decimals
    n = math.trunc(round(float(x) * scale, 3))  # the round() absorbs float noise (2.7704 -> 27703.9999)
    return repr(n / scale) if n != 0 else "0.0"


def smiles_tokens(smiles: str) -> list[str]:
    return SMILES_TOKEN_RE.findall(smiles)


def is_atom_token(tok: str) -> bool:
    return bool(_ATOM_RE.match(tok)) and tok not in (SMILES_TAG, SMILES_END, CONF_TAG, CONF_END)


def encode(mol: Chem.Mol, conf_id: int = -1) -> tuple[str, str]:
    """Return (canonical isomeric SMILES, enriched string) for a molecule with a conformer."""
    from rdkit import Chem

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


def principal_frame(xyz: np.ndarray) -> np.ndarray:
    """Coordinates [N, 3] centred on their centroid and rotated onto their principal axes.

    The rule (unit masses, all heavy atoms, in the given atom order):
    - centre: subtract the centroid;
    - axes: eigenvectors of the covariance of the centred coordinates (`numpy.linalg.eigh`),
      ordered by eigenvalue, axis 1 = largest spread, axis 2 = the next;
    - signs of axes 1 and 2: the one that makes the third moment sum(p**3) of the projections p
      positive; when |sum(p**3)| <= 1e-6 * sum(|p|**3) (symmetric along the axis, or all p = 0), the
      one that makes the projection of the first atom with |p| > 1e-3 positive; if there is none,
      the sign as eigh computed it;
    - axis 3 = cross(axis 1, axis 2), so the transform is a proper rotation (det +1): a reflection
      would mirror the molecule and invert its stereocentres, which an RMSD without reflection
      (and the chirality read from 3D) would punish.
    Degenerate spreads (1-2 atoms, linear or highly symmetric molecules) never fail: eigh's
    orthonormal basis of the degenerate eigenspace is used as it comes, then the sign rule.
    The result is then deterministic for a given input and, up to the truncation of the input,
    independent of the frame the conformer was given in (except where the sign or axis choice is
    degenerate)."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    if len(xyz) == 0:
        return xyz.copy()
    y = xyz - xyz.mean(axis=0)
    _, vecs = np.linalg.eigh(y.T @ y / len(y))  # ascending eigenvalues
    axes = [vecs[:, 2], vecs[:, 1]]
    for k, a in enumerate(axes):
        p = y @ a
        m3, tol = float(np.sum(p**3)), 1e-6 * float(np.sum(np.abs(p) ** 3))
        if abs(m3) > tol:
            sign = 1.0 if m3 > 0 else -1.0
        else:
            big = np.flatnonzero(np.abs(p) > 1e-3)
            sign = 1.0 if len(big) == 0 or p[big[0]] > 0 else -1.0
        axes[k] = sign * a
    rot = np.stack([axes[0], axes[1], np.cross(axes[0], axes[1])])  # rows: the new axes, det +1
    return y @ rot.T


def reframe(enriched: str, frame: str = "raw", decimals: int = 4) -> str:
    """The enriched string with its coordinates in `frame` and truncated to `decimals` decimals.

    frame "raw" keeps the coordinates as written; "principal" moves them to the principal-axes
    frame of `principal_frame` (centroid at the origin, proper rotation). Each `<x,y,z>` is then
    rewritten with `fmt_coord(v, decimals)` (truncation toward zero); everything else is unchanged.
    "raw" at 4 decimals returns the input itself. Pure; raises ValueError on an unknown `frame`
    or a `decimals` that is not an integer in 1-4."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or decimals not in DECIMALS:
        raise ValueError(f"decimals must be one of {DECIMALS}, got {decimals!r}")
    if frame == "raw" and decimals == 4:
        return enriched
    matches = list(_ENRICHED_ATOM_RE.finditer(enriched))
    if not matches:
        return enriched
    xyz = np.array([[float(v) for v in m.groups()[1:]] for m in matches])
    if frame == "principal":
        xyz = principal_frame(xyz)
    new = iter(xyz)

    def sub(m):
        x, y, z = next(new)
        return f"{m.group(1)}<{fmt_coord(x, decimals)},{fmt_coord(y, decimals)},{fmt_coord(z, decimals)}>"

    return _ENRICHED_ATOM_RE.sub(sub, enriched)


def strip_coords(enriched: str) -> str:
    """The plain SMILES of an enriched string (coordinates and added brackets removed)."""
    text = re.sub(r"<[^>]*>", "", enriched)
    return "".join(_BARE.get(t, t) for t in smiles_tokens(text))


def decode(enriched: str) -> Chem.Mol:
    """Rebuild an RDKit molecule (heavy atoms) with the conformer written in `enriched`."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

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
    from rdkit import Chem

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
    from rdkit import Chem
    from rdkit.Chem import AllChem

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
