"""CG trajectory analysis: RMSD to the folded structure, radius of gyration, fraction of native
contacts Q, free-energy surfaces over (RMSD, Q) and their overlap with a reference.

Definitions (CA beads, Å):
- RMSD after optimal superposition (Kabsch) onto the folded structure;
- Rg = sqrt(mean |x - centroid|^2), unweighted;
- native contacts: pairs with sequence separation > 3 whose CA distance in the folded structure
  is below 8 Å; Q = mean over them of 1 / (1 + exp(beta (r - lambda r0))), beta = 5 / Å,
  lambda = 1.2 (Best, Hummer and Eaton 2013, with lambda set for CA distances);
- F(RMSD, Q) = -kT ln p on a shared grid; the overlap score is sum over bins of min(p, q) for
  the two normalised histograms: 1 for identical distributions, 0 for disjoint ones.
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
