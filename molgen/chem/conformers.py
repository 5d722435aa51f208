"""Conformer ensemble metrics: heavy-atom RMSD, COV/MAT (REFERENCE.md section 1)."""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign


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
