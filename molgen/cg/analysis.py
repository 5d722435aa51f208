"""CG trajectory analysis: RMSD to the folded structure, radius of gyration, fraction of native
contacts Q, free-energy surfaces over (RMSD, Q) and their overlap with a reference.

Definitions (CA beads, Å):
- RMSD after optimal superposition (Kabsch) onto the folded structure;
- Rg = sqrt(mean |x - centroid|^2), unweighted;
- native contacts: pairs with sequence separation > 3 whose CA distance in the folded structure
  is below 8 Å; Q = mean over them of 1 / (1 + exp(beta (r - lambda r0))), beta = 5 / Å,
  lambda = 1.2 (Best, Hummer and Eaton 2013, with lambda set for CA distances);
- F(RMSD, Q) = -kT ln p on a shared grid; the overlap score is sum over bins of min(p, q) for
  the two normalised histograms: 1 for identical distributions, 0 for disjoint ones;
- end-to-end distance: first to last CA of the chain;
- transitions (`transitions`): core to core with hysteresis: a frame below `folded_below` is in
  the folded core, one above `unfolded_above` in the unfolded core, frames between keep the last
  core visited; a folding event is unfolded core -> folded core, unfolding the reverse;
- error bars of a time average (`block_average`): the standard error of the means of
  contiguous blocks;
- TICA (`tica`): the generalised eigenvectors of the symmetrised time-lagged covariance against
  the instantaneous one, fitted on the reference trajectories; implied timescale -lag / ln(eigenvalue).
"""

from __future__ import annotations

import numpy as np

from molgen.cg.priors import KB


def kabsch_rmsd(traj_FxNx3, ref_Nx3) -> np.ndarray:
    x = np.asarray(traj_FxNx3, np.float64)
    y = np.asarray(ref_Nx3, np.float64) - np.mean(ref_Nx3, axis=0)
    x = x - x.mean(axis=1, keepdims=True)
    h = np.einsum("fni,nj->fij", x, y)
    u, s, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.einsum("fij,fjk->fik", u, vt)))
    s[:, -1] *= d  # no reflections
    e = np.sum(x**2, axis=(1, 2)) + np.sum(y**2) - 2 * np.sum(s, axis=1)
    return np.sqrt(np.maximum(e, 0.0) / x.shape[1])


def radius_of_gyration(traj_FxNx3) -> np.ndarray:
    x = np.asarray(traj_FxNx3, np.float64)
    return np.sqrt(np.mean(np.sum((x - x.mean(axis=1, keepdims=True)) ** 2, axis=-1), axis=-1))


def native_contacts(ref_Nx3, cutoff: float = 8.0, min_sep: int = 4):
    ref = np.asarray(ref_Nx3, np.float64)
    i, j = np.triu_indices(len(ref), min_sep)
    r0 = np.linalg.norm(ref[i] - ref[j], axis=-1)
    keep = r0 < cutoff
    return np.stack([i[keep], j[keep]], -1), r0[keep]


def fraction_native(traj_FxNx3, pairs, r0, beta: float = 5.0, lam: float = 1.2) -> np.ndarray:
    x = np.asarray(traj_FxNx3, np.float64)
    r = np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)
    return np.mean(1.0 / (1.0 + np.exp(beta * (r - lam * r0))), axis=-1)


def bond_lengths(traj_FxNx3, chains) -> np.ndarray:
    """[F, bonds] consecutive-bead distances within each chain."""
    x = np.asarray(traj_FxNx3, np.float64)
    starts = np.cumsum([0, *chains[:-1]])
    idx = np.concatenate([np.arange(s, s + n - 1) for s, n in zip(starts, chains, strict=True)])
    return np.linalg.norm(x[:, idx + 1] - x[:, idx], axis=-1)


def observables(traj_FxNx3, folded_Nx3) -> dict:
    pairs, r0 = native_contacts(folded_Nx3)
    return {"rmsd": kabsch_rmsd(traj_FxNx3, folded_Nx3), "rg": radius_of_gyration(traj_FxNx3),
            "q": fraction_native(traj_FxNx3, pairs, r0)}  # fmt: skip


def histogram2d(rmsd, q, edges):
    h, _, _ = np.histogram2d(rmsd, q, bins=edges)
    return h / max(h.sum(), 1)


def overlap(p, q) -> float:
    return float(np.minimum(p, q).sum())


def free_energy(p, temperature: float):
    with np.errstate(divide="ignore"):
        f = -KB * temperature * np.log(p)
    return f - np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else f


def compare(model_obs: dict, ref_obs: dict, temperature: float, path=None, bins: int = 30,
            labels=("CG model", "all-atom reference")) -> dict:  # fmt: skip
    """Overlap scores of the (RMSD, Q) histogram and of each 1D histogram, with plots."""
    hi = max(np.max(model_obs["rmsd"]), np.max(ref_obs["rmsd"])) * 1.05
    edges = (np.linspace(0, hi, bins + 1), np.linspace(0, 1, bins + 1))
    pm, pr = histogram2d(model_obs["rmsd"], model_obs["q"], edges), histogram2d(ref_obs["rmsd"], ref_obs["q"], edges)
    out = {"overlap_rmsd_q": overlap(pm, pr), "temperature": temperature, "bins": bins}
    for k in ("rmsd", "rg", "q"):
        lo = min(np.min(model_obs[k]), np.min(ref_obs[k]))
        top = max(np.max(model_obs[k]), np.max(ref_obs[k]))
        e = np.linspace(lo, top + 1e-9, bins + 1)
        a = np.histogram(model_obs[k], e)[0]
        b = np.histogram(ref_obs[k], e)[0]
        out[f"overlap_{k}"] = overlap(a / max(a.sum(), 1), b / max(b.sum(), 1))
        out[f"mean_{k}"] = {labels[0]: float(np.mean(model_obs[k])), labels[1]: float(np.mean(ref_obs[k]))}
    if path is not None:
        _plot(pm, pr, edges, model_obs, ref_obs, temperature, out, path, labels)
    return out


def _plot(pm, pr, edges, mo, ro, temperature, scores, path, labels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    fm, fr = free_energy(pm, temperature), free_energy(pr, temperature)
    vmax = np.nanmax(np.where(np.isfinite(fm), fm, np.nan).tolist() + np.where(np.isfinite(fr), fr, np.nan).tolist())
    for ax, f, name in ((axes[0], fm, labels[0]), (axes[1], fr, labels[1])):
        im = ax.imshow(np.where(np.isfinite(f), f, np.nan).T, origin="lower", aspect="auto", vmin=0, vmax=vmax,
                       extent=(edges[0][0], edges[0][-1], 0, 1), cmap="viridis")  # fmt: skip
        ax.set(title=f"{name}: F(RMSD, Q), {temperature:g} K", xlabel="RMSD to folded (Å)", ylabel="Q")
        fig.colorbar(im, ax=ax, label="kcal/mol")
    for ax, k, xlabel in zip(axes[2:], ("rmsd", "rg", "q"), ("RMSD (Å)", "Rg (Å)", "Q"), strict=True):
        ax.hist(mo[k], bins=40, density=True, alpha=0.6, label=labels[0])
        ax.hist(ro[k], bins=40, density=True, alpha=0.6, label=labels[1])
        ax.set(xlabel=xlabel, title=f"overlap {scores[f'overlap_{k}']:.2f}")
        ax.legend(fontsize=7)
    fig.suptitle(f"(RMSD, Q) histogram overlap {scores['overlap_rmsd_q']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def end_to_end(traj_FxNx3) -> np.ndarray:
    return np.linalg.norm(traj_FxNx3[:, -1] - traj_FxNx3[:, 0], axis=-1)


def block_average(x, n_blocks: int = 10) -> tuple[float, float]:
    """(mean, standard error) of a time series from the means of `n_blocks` contiguous blocks
    (the frames beyond a whole number of blocks at the end are dropped)."""
    x = np.asarray(x, np.float64)
    size = len(x) // n_blocks
    if n_blocks < 2 or size < 1:
        raise ValueError(f"block_average: {len(x)} frames cannot make {n_blocks} blocks")
    means = x[: size * n_blocks].reshape(n_blocks, size).mean(1)
    return float(means.mean()), float(means.std(ddof=1) / np.sqrt(n_blocks))


def transitions(rmsd, folded_below: float, unfolded_above: float) -> dict:
    """Core-to-core folding and unfolding events of one trajectory (see the module docstring)."""
    if not folded_below < unfolded_above:
        raise ValueError(f"transitions: folded_below {folded_below} must be below unfolded_above {unfolded_above}")
    state, folding, unfolding = None, 0, 0
    for r in np.asarray(rmsd):
        new = "folded" if r < folded_below else "unfolded" if r > unfolded_above else state
        if state is not None and new != state:
            folding += new == "folded"
            unfolding += new == "unfolded"
        state = new
    return {"folding": int(folding), "unfolding": int(unfolding), "last": state}


def pair_distances(traj_FxNx3, min_sep: int = 3) -> np.ndarray:
    """CA pair distances with sequence separation >= min_sep, [F, pairs] (TICA features)."""
    i, j = np.triu_indices(traj_FxNx3.shape[1], min_sep)
    return np.linalg.norm(traj_FxNx3[:, i] - traj_FxNx3[:, j], axis=-1)


def tica(trajs: list, lag: int, dim: int = 2, ridge: float = 1e-6) -> dict:
    """TICA of feature trajectories [F_k, D] (one per replica; pairs never cross replicas):
    mean, projection vectors [D, dim] (unit variance), eigenvalues and implied timescales in
    frames, slowest first."""
    from scipy.linalg import eigh

    trajs = [np.asarray(t, np.float64) for t in trajs if len(t) > lag]
    if not trajs:
        raise ValueError(f"tica: no trajectory is longer than the lag ({lag} frames)")
    mean = np.concatenate(trajs).mean(0)
    a = np.concatenate([t[:-lag] - mean for t in trajs])
    b = np.concatenate([t[lag:] - mean for t in trajs])
    c0 = (a.T @ a + b.T @ b) / (2 * len(a))
    ct = (a.T @ b + b.T @ a) / (2 * len(a))
    c0 += ridge * np.trace(c0) / len(c0) * np.eye(len(c0))
    vals, vecs = eigh(ct, c0)
    order = np.argsort(vals)[::-1][:dim]
    vals, vecs = vals[order], vecs[:, order]
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = np.where((vals > 0) & (vals < 1), -lag / np.log(vals), np.inf)
    return {"mean": mean, "vectors": vecs, "eigenvalues": vals, "timescales": ts, "lag": lag}


def tica_project(features_FxD, model: dict) -> np.ndarray:
    return (np.asarray(features_FxD, np.float64) - model["mean"]) @ model["vectors"]
