"""Conformer ensemble metrics: heavy-atom RMSD, COV/MAT (REFERENCE.md section 1)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdMolAlign

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


def standard_error(xs) -> float:
    """Standard error of the mean (sample std, ddof 1); NaN for fewer than two values."""
    xs = np.asarray(xs, float)
    return float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def aggregate(records: list[dict], mat_cap: float = 3.0) -> dict:
    """COV/MAT over molecules, each with its standard error over molecules (`_se`), from
    per-molecule {n_valid, cov_r, mat_r, cov_p, mat_p}. COV counts a molecule with no valid
    sample as 0. MAT is given twice: over all molecules, with such a molecule counted at
    `mat_cap` Å (and no molecule above it), and over the molecules with a valid sample only
    (`_valid`), which flatters a weak model. `no_valid_share`: the share of such molecules."""
    valid = [r for r in records if r["n_valid"] > 0]
    cols = {
        "cov_r": [r["cov_r"] for r in records],
        "cov_p": [r["cov_p"] for r in records],
        # a non-finite MAT (no finite RMSD although a sample is valid) counts at the cap too
        **{
            k: [min(r[k], mat_cap) if r["n_valid"] > 0 and np.isfinite(r[k]) else mat_cap for r in records]
            for k in ("mat_r", "mat_p")
        },  # fmt: skip
        **{f"{k}_valid": [r[k] for r in valid] for k in ("mat_r", "mat_p")},
    }
    out = {}
    for k, xs in cols.items():
        xs = np.asarray(xs, float)
        out[k] = float(xs.mean()) if len(xs) else float("nan")
        out[f"{k}_se"] = standard_error(xs)
    out["no_valid_share"] = 1.0 - len(valid) / max(len(records), 1)
    return out


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


def judge_texts(smiles: str, ref: Chem.Mol, texts: list[str]) -> tuple[list, list[str], np.ndarray]:
    """The one scoring path of generated conformers (evaluation, rewards, rollouts): each text is
    gated (tags, decodes, same graph as `smiles`, finite RMSD row) and scored against every
    reference conformer. Returns (molecules, or None where a gate failed; reasons, "" when
    valid; D [texts, references] heavy-atom RMSD, inf for failed texts)."""
    mols, reasons = [], []
    d = np.full((len(texts), ref.GetNumConformers()), np.inf)
    for i, t in enumerate(texts):
        mol, why = check_sample(t, smiles)
        if mol is not None:
            d[i] = rmsd_matrix([mol], ref)[0]
            if not np.all(np.isfinite(d[i])):
                mol, why, d[i] = None, "rmsd", np.inf
        mols.append(mol)
        reasons.append(why)
    return mols, reasons, d


def score_ensemble(gens: list[Chem.Mol], ref: Chem.Mol, delta: float) -> tuple[list[float], dict]:
    """(RMSD of each conformer to its nearest reference conformer, {n_ref, COV/MAT-R/P, best_rmsd})
    of a set of conformers of one molecule against its reference ensemble."""
    d = rmsd_matrix(gens, ref) if gens else np.zeros((0, ref.GetNumConformers()))
    nearest = [float(np.nanmin(row)) if np.isfinite(row).any() else float("nan") for row in d]
    metrics = {"n_ref": ref.GetNumConformers(), **coverage_matching(d, delta)}
    metrics["best_rmsd"] = float(np.nanmin(nearest)) if np.isfinite(nearest).any() else None
    return nearest, metrics


def mmff_relax(mol: Chem.Mol, max_iters: int = 500) -> Chem.Mol | None:
    """MMFF94 relaxation of a heavy-atom conformer (hydrogens placed first); None if MMFF
    cannot type the molecule, its optimiser fails on the start geometry, or the result is not
    finite (counted as `failed` under "mmff")."""
    h = Chem.AddHs(mol, addCoords=True)
    if not AllChem.MMFFHasAllMoleculeParams(h):
        return None
    RDLogger.DisableLog("rdApp.*")  # a failure below prints a C++ stack trace per conformer
    try:
        AllChem.MMFFOptimizeMolecule(h, maxIters=max_iters)
    except RuntimeError:  # RDKit's BFGS raises ("bad direction in linearSearch") on some sampled geometries
        return None
    finally:
        RDLogger.EnableLog("rdApp.*")
    out = Chem.RemoveHs(h)
    return out if np.isfinite(out.GetConformer().GetPositions()).all() else None


def rdkit_baseline(smiles: str, ref: Chem.Mol, n: int, seed: int, delta: float) -> dict[str, dict]:
    """The classical baseline for one molecule: `n` RDKit ETKDGv3 conformers drawn with `seed`
    (give one the references were not drawn with), scored against `ref` raw and after MMFF94:
    {"rdkit_etkdg": {...}, "rdkit_etkdg_mmff": {...}}, each COV/MAT, best RMSD and n_valid."""
    out = {}
    for key, mmff in (("rdkit_etkdg", False), ("rdkit_etkdg_mmff", True)):
        try:
            emb = enriched.embed_conformers(smiles, n, seed=seed, mmff=mmff)
        except enriched.EnrichedError as e:
            out[key] = {"n_valid": 0, "error": str(e), **coverage_matching(np.zeros((0, 1)), delta)}
            continue
        gens = [Chem.Mol(emb, confId=c.GetId()) for c in emb.GetConformers()]
        out[key] = {"n_valid": len(gens), **score_ensemble(gens, ref, delta)[1]}
    return out


def score_molecule(job):
    """Pool worker: (smiles, [reference enriched], [generated texts], delta[, baseline seed or None
    [, relax]]) -> per-molecule record; with a baseline seed it also holds `rdkit_baseline`'s two
    entries, and with relax="mmff" the model's valid conformers after MMFF94 under "lm_mmff"."""
    smiles, refs, texts, delta, *rest = job
    ref = reference_mol(refs)
    mols, why, d = judge_texts(smiles, ref, texts)
    gens = [m for m in mols if m is not None]
    d = d[[m is not None for m in mols]]
    reasons = defaultdict(int)
    for w in why:
        reasons[w or "valid"] += 1
    rec = {"smiles": smiles, "n_ref": len(refs), "n_gen": len(texts), "n_valid": len(gens), "reasons": dict(reasons)}
    rec.update(coverage_matching(d, delta))
    rec["min_rmsd"] = [float(x) for x in (d.min(axis=1) if len(gens) else [])]
    rec["ref_min"] = [float(x) for x in (d.min(axis=0) if len(gens) else [99.0] * len(refs))]
    rec["valid_sdf"] = [Chem.MolToMolBlock(g) for g in gens]
    if rest and rest[0] is not None:
        rec.update(rdkit_baseline(smiles, ref, len(texts), rest[0], delta))
    if len(rest) > 1 and rest[1] == "mmff":  # the model's valid conformers after MMFF94, as the baseline's
        relaxed = [r for r in (mmff_relax(g) for g in gens) if r is not None]
        rec["lm_mmff"] = {"n_valid": len(relaxed), "failed": len(gens) - len(relaxed)}
        rec["lm_mmff"].update(score_ensemble(relaxed, ref, delta)[1])
    return rec
