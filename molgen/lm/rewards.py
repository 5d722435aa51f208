"""Conformer rewards for post-training (REFERENCE.md section 1, "Reward v3").

A group is the G completions sampled for one prompt molecule, scored against that
molecule's M reference conformers. With D[i, j] the heavy-atom RMSD (RDKit GetBestRMS) of
rollout i to reference j:

- validity gates: the tags are present, the conformer decodes, its graph is the prompt's, and
  its RMSD row is finite; a rollout failing any gate gets `floor` (-1) and nothing else;
- r_qual_i  = exp(-min_j D_ij / sigma);
- K_ij = sigmoid((delta - D_ij) / rho) (soft "rollout i covers reference j"), and
  r_smcov_i = (1/M) sum_j K_ij prod_{l != i} (1 - K_lj): reference j pays rollout i only in so far
  as no other rollout of the group covers it (soft, unique coverage);
- r_match_i: the group's rollouts and references are matched one-to-one (Hungarian,
  maximising the total score) with score max(0, 1 - D_ij/delta); rollout i gets its pair's score
  (0 when unmatched or matched beyond delta).

reward_i = w_smcov r_smcov + w_qual r_qual + w_match r_match for a valid rollout.
The pure functions here take D; `judge_group` is the host-worker job that parses, gates and
computes D with RDKit. `RewardPool` runs those jobs in spawned worker processes, so that
the device keeps sampling while RMSDs are computed.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import numpy as np
from rdkit import RDLogger
from scipy.optimize import linear_sum_assignment
from scipy.special import expit

from molgen.chem import conformers

RDLogger.DisableLog("rdApp.*")  # sampled text is often not chemistry; failures are counted, not printed
DEFAULTS = dict(w_smcov=5.0, w_qual=0.0, w_match=0.0, delta=0.75, rho=0.07, sigma=0.3, floor=-1.0)
COMPONENTS = ("r_qual", "r_smcov", "r_match")


def r_qual(d_GxM: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-d_GxM.min(axis=1) / sigma)


def soft_coverage(d_GxM: np.ndarray, delta: float, rho: float) -> np.ndarray:
    k = expit((delta - d_GxM) / rho)  # K_ij (expit: no overflow warning when D >> delta)
    miss = 1.0 - k
    # prod over l != i of (1 - K_lj), without dividing by (1 - K_ij) (which may be 0)
    g = d_GxM.shape[0]
    others = np.stack([np.prod(np.delete(miss, i, axis=0), axis=0) for i in range(g)]) if g else miss
    return (k * others).mean(axis=1)


def hungarian_match(d_GxM: np.ndarray, delta: float) -> np.ndarray:
    score = np.maximum(0.0, 1.0 - d_GxM / delta)
    out = np.zeros(d_GxM.shape[0])
    if score.size:
        rows, cols = linear_sum_assignment(score, maximize=True)
        out[rows] = score[rows, cols]
    return out


def combine(d_GxM: np.ndarray, valid_G: np.ndarray, cfg: dict) -> dict[str, np.ndarray]:
    """Per-rollout reward and components from D [G, M] (rows of invalid rollouts are ignored)."""
    cfg = {**DEFAULTS, **cfg}
    g = len(valid_G)
    comps = {k: np.zeros(g) for k in COMPONENTS}
    v = np.flatnonzero(valid_G)
    if len(v):
        d = d_GxM[v]
        comps["r_qual"][v] = r_qual(d, cfg["sigma"])
        comps["r_smcov"][v] = soft_coverage(d, cfg["delta"], cfg["rho"])
        comps["r_match"][v] = hungarian_match(d, cfg["delta"])
    reward = cfg["w_smcov"] * comps["r_smcov"] + cfg["w_qual"] * comps["r_qual"] + cfg["w_match"] * comps["r_match"]
    reward = np.where(valid_G, reward, cfg["floor"])
    return {"reward": reward, **comps}


def judge_group(job) -> dict:
    """Host worker: (prompt SMILES, reference enriched strings, completion texts, reward cfg)
    -> {"records": one per completion (reward, components, validity, failure reason, min RMSD),
    "cov": the group's COV/MAT-R/P at the reward's delta}.

    Completion texts are whole units (`[SMILES]..[/SMILES][CONFORMER]..[/CONFORMER]`)."""
    smiles, refs, texts, cfg = job
    mols, reasons, d = conformers.judge_texts(smiles, conformers.reference_mol(refs), texts)
    valid = np.asarray([m is not None for m in mols], bool)
    out = combine(np.where(np.isfinite(d), d, 1e6), valid, cfg)
    recs = []
    for i in range(len(texts)):
        rec = {k: float(out[k][i]) for k in out}
        rec.update(valid=bool(valid[i]), reason=reasons[i] or "valid")
        rec["min_rmsd"] = float(d[i].min()) if valid[i] else None
        recs.append(rec)
    cov = conformers.coverage_matching(d[valid], {**DEFAULTS, **cfg}["delta"])
    return {"records": recs, "cov": cov}


def summarize(records: list[dict]) -> dict:
    """Batch means for logging: reward, components, validity, failure reasons, mean min-RMSD."""
    n = max(len(records), 1)
    out = {"reward": sum(r["reward"] for r in records) / n, "validity": sum(r["valid"] for r in records) / n}
    for k in COMPONENTS:
        out[k] = sum(r[k] for r in records) / n
    rms = [r["min_rmsd"] for r in records if r["valid"]]
    out["min_rmsd"] = float(np.mean(rms)) if rms else float("nan")
    for why, c in Counter(r["reason"] for r in records).items():
        if why != "valid":
            out[f"fail_{why}"] = c / n
    return out


class RewardPool:
    """Spawned worker processes that judge groups while the caller keeps the device busy.

    `submit(jobs)` returns a handle at once; `collect(handle)` waits for its records."""

    def __init__(self, workers: int):
        self.pool = mp.get_context("spawn").Pool(max(1, workers)) if workers > 0 else None

    def submit(self, jobs):
        if self.pool is None:
            return [judge_group(j) for j in jobs]
        return self.pool.map_async(judge_group, jobs, chunksize=1)

    @staticmethod
    def collect(handle) -> list[list[dict]]:
        return handle if isinstance(handle, list) else handle.get()

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None
