"""Crystal structure prediction (CSP): a composition in, structures out (`crystal_csp`).

A composition-conditioned LDM (`cond.composition=True`: the DiT sees the element fractions, with
classifier-free guidance) samples latents for exactly the composition's atom count; the VAE
decodes them, and the decoded species are replaced by the given ones. The replacement keeps the
decoder's own placement: the given atoms are assigned to the decoded sites by a maximum-likelihood
matching (Hungarian algorithm on the decoder's species log-probabilities), so every sample has
exactly the requested composition.

Evaluation on the held-out (test) compositions, as DiffCSP and CDVAE report it: StructureMatcher
(stol 0.5, ltol 0.3, angle_tol 10) of each sample against the test crystal of that composition;
match rate and RMSE (normalised by (V/n)^(1/3), averaged over the matched) for one sample per
composition and for the best of `csp.k` (a match if any sample matches, its RMSE the smallest).
Matching runs over all cores (`chem.match_index.pmap`) with a progress line.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from molgen.chem import crystal as xtal
from molgen.chem import match_index
from molgen.crystal import diffusion, structures
from molgen.crystal.common import crystals_of, load_splits, vae_info

log = logging.getLogger("molgen")


def assign_species(log_probs, species) -> np.ndarray:
    """The given atomic numbers (n,) placed on the n decoded sites: the permutation that maximises
    the sum of log p(site i is species z) (`log_probs`: (n, 100) over Z = 1..100)."""
    from scipy.optimize import linear_sum_assignment

    species = np.asarray(species, int)
    cost = -np.asarray(log_probs, np.float64)[:, species - 1]  # (site, given atom)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(species), int)
    out[rows] = species[cols]
    return out


def predict(sampler, compositions, k: int, seed: int, *, steps: int = 50, eta: float = 0.0, guidance: float = 2.0,
            batch: int = 500) -> list[list]:  # fmt: skip
    """k structures (Crystal or None where the decoded lattice admits no cell) for each composition
    (a sequence of atomic numbers, one per atom), each with exactly those atoms."""
    n_max = sampler.vmodel.n_max
    jobs = [(i, np.asarray(c, int)) for i, c in enumerate(compositions) for _ in range(k)]
    for _, c in jobs:
        if not 0 < len(c) <= n_max:
            raise ValueError(f"a composition of {len(c)} atoms: the model holds 1-{n_max}")
    out = [[] for _ in compositions]
    key = jax.random.key(seed)
    for s in range(0, len(jobs), batch):
        part = jobs[s : s + batch]
        pad = batch - len(part)
        part_p = part + [part[-1]] * pad  # fixed shapes: one compilation
        mask = np.stack([np.arange(n_max) < len(c) for _, c in part_p])
        species = np.stack([np.pad(c, (0, n_max - len(c))) for _, c in part_p])
        cond = {"composition": diffusion.composition(jnp.asarray(species), jnp.asarray(mask))}
        res, _ = sampler.latents(jax.random.fold_in(key, s), mask, steps=steps, eta=eta, cond=cond, guidance=guidance)
        res = jax.device_get(res)
        logp = np.asarray(jax.nn.log_softmax(res["species_logits"], -1))
        crystals = structures.to_crystals(res, mask)
        for j, (i, c) in enumerate(part):
            cr = crystals[j]
            if cr is not None:
                cr = xtal.Crystal(cr.lattice, cr.frac, assign_species(logp[j][: len(c)], c))
            out[i].append(cr)
    return out


def _match_one(task):
    preds, ref = task
    sm = xtal.matcher()
    return [None if p is None else xtal.match_rms(p, ref, sm) for p in preds]


def evaluate(preds: list[list], refs: list, workers: int | None = None) -> dict:
    """Match rate and RMSE for the first sample of each composition and for the best of all."""
    import os

    workers = workers or len(os.sched_getaffinity(0)) or 1
    rms = match_index.pmap(_match_one, list(zip(preds, refs, strict=True)), workers, "CSP matching")
    first = [r[0] for r in rms]
    best = [min((x for x in r if x is not None), default=None) for r in rms]
    n = len(refs)

    def rate(rs):
        hit = [x for x in rs if x is not None]
        p = len(hit) / max(n, 1)
        return {"match_rate": p, "match_rate_se": float(np.sqrt(p * (1 - p) / max(n, 1))),
                "rmse": float(np.mean(hit)) if hit else float("nan"), "matched": len(hit)}  # fmt: skip

    k = max(len(p) for p in preds) if preds else 0
    return {"n": n, "k": k, "k1": rate(first), f"k{k}": rate(best)}


def train_and_evaluate(config, workdir: str):
    """Train the composition-conditioned LDM (train_ldm), then CSP on the test compositions."""
    from molgen.core import loop
    from molgen.crystal import train_ldm

    if not config.cond.composition:
        raise ValueError("crystal_csp needs cond.composition=True (a composition-conditioned LDM)")
    train_ldm.train_ldm(config, workdir)
    sampler, info = train_ldm.load_ldm(workdir)
    _, _, splits, _ = load_splits(config, vae_info(info["vae_workdir"]))
    refs = crystals_of(splits["test"])
    if config.csp.n_test:
        refs = refs[: config.csp.n_test]
    cc = config.csp
    if jax.process_index() != 0:
        return {}
    t = time.time()
    preds = predict(sampler, [c.species for c in refs], cc.k, cc.seed, steps=cc.steps, eta=cc.eta,
                    guidance=cc.guidance, batch=cc.batch)  # fmt: skip
    t_sample = time.time() - t
    for p, ref in zip(preds, refs, strict=True):
        for c in p:
            if c is not None and sorted(c.species.tolist()) != sorted(np.asarray(ref.species).tolist()):
                raise AssertionError("a CSP sample lost its composition")  # assign_species keeps it by construction
    res = evaluate(preds, refs)
    res.update(sample_seconds=t_sample, match_seconds=time.time() - t - t_sample, steps=cc.steps, eta=cc.eta,
               guidance=cc.guidance)  # fmt: skip
    loop.write_json(workdir, "csp.json", res)
    structures.write_cifs([p[0] for p in preds], f"{workdir}/samples/csp_k1")
    log.info("CSP on %d test compositions: k=1 match %.4f RMSE %.4f; k=%d match %.4f RMSE %.4f", res["n"],
             res["k1"]["match_rate"], res["k1"]["rmse"], cc.k, res[f"k{cc.k}"]["match_rate"],
             res[f"k{cc.k}"]["rmse"])  # fmt: skip
    return res
