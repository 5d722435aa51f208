"""Conformer ensemble metrics: heavy-atom RMSD, COV/MAT (REFERENCE.md section 1)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from molgen.chem import enriched


def best_rms(probe: Chem.Mol, ref: Chem.Mol, probe_id: int = -1, ref_id: int = -1) -> float:
    """Symmetry-aware heavy-atom RMSD after optimal alignment (RDKit GetBestRMS)."""
    try:
        return float(rdMolAlign.GetBestRMS(Chem.RemoveHs(probe), Chem.RemoveHs(ref), prbId=probe_id, refId=ref_id))
    except RuntimeError:
        return float("nan")


def rmsd_matrix(gen: list[Chem.Mol], ref: Chem.Mol) -> np.ndarray:
    """D[i, j] = RMSD of generated molecule i (first conformer) to conformer j of `ref`."""
    ref_ids = [c.GetId() for c in ref.GetConformers()]
    d = np.full((len(gen), len(ref_ids)), np.nan)
    for i, g in enumerate(gen):
        for j, rid in enumerate(ref_ids):
            d[i, j] = best_rms(g, ref, ref_id=rid)
    return d


def coverage_matching(d: np.ndarray, delta: float = 0.75) -> dict[str, float]:
    """COV/MAT in both directions from D[generated, reference]; NaN entries count as misses."""
    d = np.where(np.isfinite(d), d, np.inf)
    if d.shape[0] == 0 or d.shape[1] == 0:
        return {"cov_r": 0.0, "mat_r": float("nan"), "cov_p": 0.0, "mat_p": float("nan")}
    min_r, min_p = d.min(axis=0), d.min(axis=1)
    mean = lambda x: float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")  # noqa: E731
    return {
        "cov_r": float(np.mean(min_r <= delta)),
        "mat_r": mean(min_r),
        "cov_p": float(np.mean(min_p <= delta)),
        "mat_p": mean(min_p),
    }


def check_sample(text: str, prompt_smiles: str):
    """(molecule or None, failure reason or ""): tags present, decodes, same graph as the prompt."""
    try:
        smi, enr = enriched.split_unit(text)
    except enriched.EnrichedError:
        return None, "tags"
    try:
        mol = enriched.decode(enr)
    except enriched.EnrichedError:
        return None, "decode"
    except Exception:  # RDKit sanitisation errors and the like
        return None, "decode"
    if not enriched.same_graph(mol, prompt_smiles):
        return None, "graph"
    return mol, ""


def reference_mol(refs: list[str]) -> Chem.Mol:
    """One RDKit molecule holding every reference conformer (enriched strings of one molecule)."""
    ref = None
    for r in refs:
        m = enriched.decode(r)
        if ref is None:
            ref = Chem.Mol(m)
        else:
            ref.AddConformer(m.GetConformer(), assignId=True)
    return ref


def score_molecule(job):
    """Pool worker: (smiles, [reference enriched], [generated texts], delta) -> per-molecule record."""
    smiles, refs, texts, delta = job
    ref = reference_mol(refs)
    gens, reasons = [], defaultdict(int)
    for t in texts:
        mol, why = check_sample(t, smiles)
        reasons[why or "valid"] += 1
        if mol is not None:
            gens.append(mol)
    d = rmsd_matrix(gens, ref) if gens else np.zeros((0, len(refs)))
    rec = {"smiles": smiles, "n_ref": len(refs), "n_gen": len(texts), "n_valid": len(gens), "reasons": dict(reasons)}
    rec.update(coverage_matching(d, delta))
    rec["min_rmsd"] = [float(x) for x in (np.nan_to_num(d, nan=99.0).min(axis=1) if len(gens) else [])]
    rec["ref_min"] = [float(x) for x in (np.nan_to_num(d, nan=99.0).min(axis=0) if len(gens) else [99.0] * len(refs))]
    rec["valid_sdf"] = [Chem.MolToMolBlock(g) for g in gens]
    return rec
