"""Evaluation of a CG force field on held-out frames: per-term forces, error statistics against
the priors alone on the same frames (paired), the fixed-CA noise floor, and the force and loss
plots written into the workdir."""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from molgen.cg import data, mdcath, simulate
from molgen.cg.energy import frame_energy
from molgen.core import logging as mlog
from molgen.core import loop

log = logging.getLogger("molgen")


def noise_floor(config, workdir, split, maps=None) -> dict:
    """E[Var(F | CA positions)] over the split's temperatures (fixed-CA MD, see
    simulate.conditional_force_noise), weighted by the split's frames per (domain, temperature),
    for the dataset's force map (`maps`: {domain: W}, the residue sums where absent; with a map
    the residue sums' floor on the same samples comes too); cached in noise_floor.json."""
    path = pathlib.Path(workdir) / "noise_floor.json"
    if path.exists():
        return json.loads(path.read_text())
    nc = config.eval.noise_floor
    maps = maps or {}
    files = {d: f for f in data.source_files(config.data.source) for d in mdcath.domains(f)}
    rng = np.random.default_rng(nc.seed)
    parts, total = [], 0.0
    groups = sorted({(d, int(t)) for d, t in zip(split["domain"], split["temperature"], strict=True)})
    for dom, temp in groups:
        idx = np.flatnonzero((split["domain"] == dom) & (split["temperature"] == temp))
        kept = mdcath.atom_frames(files[dom], dom, temp)  # a CA-mapped file keeps some frames' atoms
        usable = idx if kept is None else [i for i in idx if (int(split["replica"][i]), int(split["frame"][i])) in kept]
        if not len(usable):
            log.warning("noise floor %s %d K: no test frame has all-atom coordinates; left out", dom, temp)
            continue
        pick = rng.choice(usable, size=min(nc.configs_per_temperature, len(usable)), replace=False)
        frames = [(int(split["replica"][i]), int(split["frame"][i])) for i in pick]
        res = simulate.conditional_force_noise(files[dom], dom, temp, frames, nc.samples, nc.steps_per_sample,
                                               nc.equilibration_steps, seed=nc.seed, weights=maps.get(dom))  # fmt: skip
        res.update(domain=dom, weight=len(idx) / len(split["domain"]))
        parts.append(res)
        total += res["weight"] * res["noise_mse"]
        log.info(
            "noise floor %s %d K: %.4g (kcal/mol/Å)^2 from %d configurations", dom, temp, res["noise_mse"], len(frames)
        )
    per = np.asarray([v for g in parts for v in g["per_config"]])
    # standard error: configurations differ far more than the within-configuration estimate does
    se = float(np.sqrt(sum((g["weight"] * np.std(g["per_config"], ddof=1)) ** 2 / len(g["per_config"])
                           for g in parts if len(g["per_config"]) > 1)))  # fmt: skip
    out = {"noise_mse": total, "noise_mse_se": se, "per_config_range": [float(per.min()), float(per.max())],
           "groups": parts}  # fmt: skip
    if all("noise_mse_sum" in g for g in parts):
        out["noise_mse_residue_sum"] = float(sum(g["weight"] * g["noise_mse_sum"] for g in parts))
    loop.write_json(workdir, "noise_floor.json", out)
    return out


def predict(model, nn_params, prior_params, split, batch=16, use_net=True):
    """Forces [F, N, 3] and per-term forces of every frame (host loop over batches)."""

    @jax.jit
    def f(x, s, m):
        def per_frame(a, b, c):
            def terms(y):
                return frame_energy(model, nn_params, prior_params, y, b, c, use_net)[1]

            jac = jax.jacrev(terms)(a)
            return {k: -v for k, v in jac.items()}

        return jax.vmap(per_frame)(x, s, m)

    out = []
    n = len(split["positions"])
    for i in range(0, n, batch):
        sl = slice(i, min(i + batch, n))
        pad = batch - (sl.stop - sl.start)
        args = [
            np.concatenate([split[k][sl], np.repeat(split[k][sl][-1:], pad, 0)])
            for k in ("positions", "species", "mask")
        ]
        res = jax.device_get(f(*[jnp.asarray(a) for a in args]))
        out.append({k: v[: sl.stop - sl.start] for k, v in res.items()})
    terms = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    return sum(terms.values()), terms


def error_stats(pred, ref, mask) -> dict:
    e = (pred - ref)[mask]  # [beads, 3]
    out = {"mse": float(np.mean(e**2)), "rmse": float(np.sqrt(np.mean(e**2))), "mae": float(np.mean(np.abs(e))),
           "max": float(np.max(np.abs(e)))}  # fmt: skip
    for k, axis in enumerate("xyz"):
        out[f"rmse_{axis}"] = float(np.sqrt(np.mean(e[:, k] ** 2)))
        out[f"mae_{axis}"] = float(np.mean(np.abs(e[:, k])))
        out[f"max_{axis}"] = float(np.max(np.abs(e[:, k])))
    return out


def paired_gain(pred, prior_pred, ref, mask) -> dict:
    """Per-frame force MSE of the priors minus that of the model: mean, standard error over
    frames, and z = mean / se. The two predictions share every frame's noise, so the paired
    difference is far tighter than either MSE's own spread; z > 3 is "clearly below"."""
    m = mask[..., None]
    per = lambda p: (((p - ref) ** 2) * m).sum((1, 2)) / (3 * mask.sum(1))  # noqa: E731
    d = per(prior_pred) - per(pred)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "z": float(d.mean() / se) if se > 0 else float("nan"),
            "frames_better": float((d > 0).mean())}  # fmt: skip


def evaluate(config, workdir, model, nn_params, prior_params, split, name="test") -> dict:
    ref, mask = split["forces"], split["mask"]
    total, terms = predict(model, nn_params, prior_params, split)
    prior_total = sum(v for k, v in terms.items() if k != "allegro")
    result = {
        "frames": int(len(ref)),
        "model": error_stats(total, ref, mask),
        "priors_only": error_stats(prior_total, ref, mask),
        "reference_mean_force_norm": float(np.linalg.norm(ref[mask], axis=-1).mean()),
        "reference_force_mse_about_zero": float(np.mean(ref[mask] ** 2)),
        "terms_rms_force": {k: float(np.sqrt(np.mean(v[mask] ** 2))) for k, v in terms.items()},
    }
    result["mse_ratio_model_over_priors"] = result["model"]["mse"] / result["priors_only"]["mse"]
    result["paired_mse_gain"] = paired_gain(total, prior_total, ref, mask)
    if jax.process_index() == 0:
        _plots(workdir, name, total, prior_total, ref, mask)
    return result


def _plots(workdir, name, pred, prior_pred, ref, mask):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, q, r = pred[mask], prior_pred[mask], ref[mask]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    lim = float(np.abs(r).max()) * 1.05
    for k, axis in enumerate("xyz"):
        ax = axes[k]
        ax.plot(r[:, k], q[:, k], ".", ms=2, alpha=0.3, color="0.6", label="priors")
        ax.plot(r[:, k], p[:, k], ".", ms=2, alpha=0.4, label="priors + Allegro")
        ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.8)
        ax.set(
            title=f"F_{axis}", xlabel="reference (kcal/mol/Å)", ylabel="predicted", xlim=(-lim, lim), ylim=(-lim, lim)
        )
        ax.legend(fontsize=7, markerscale=4)
    ax = axes[3]
    ax.plot(np.linalg.norm(r, axis=-1), np.linalg.norm(p, axis=-1), ".", ms=2, alpha=0.4)
    m = float(np.linalg.norm(r, axis=-1).max())
    ax.plot([0, m], [0, m], "k-", lw=0.8)
    ax.set(title="|F|", xlabel="reference", ylabel="predicted")
    ax = axes[4]
    ax.hist((p - r).reshape(-1), bins=100, alpha=0.6, label="priors + Allegro")
    ax.hist((q - r).reshape(-1), bins=100, alpha=0.4, label="priors")
    ax.set(title="force error per component", xlabel="kcal/mol/Å")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(pathlib.Path(workdir) / f"forces_{name}.png", dpi=100)
    plt.close(fig)


def plot_loss(workdir, stage_dirs):
    """Training and validation force MSE over all stages, with the stage boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, d in stage_dirs:
        rows = mlog.read_metrics(d)
        tr = [(r["step"] + offset, r["train/force_mse"]) for r in rows if "train/force_mse" in r]
        ev = [(r["step"] + offset, r["eval/force_mse"]) for r in rows if "eval/force_mse" in r]
        if tr:
            ax.plot(*zip(*tr, strict=True), lw=0.8, label=f"{name} train")
        if ev:
            ax.plot(*zip(*ev, strict=True), "o-", ms=3, label=f"{name} validation")
        offset += max([r["step"] for r in rows], default=0)
        ax.axvline(offset, color="k", lw=0.5, ls="--")
    ax.set(xlabel="step", ylabel="force MSE (kcal/mol/Å)²", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(pathlib.Path(workdir) / "loss.png", dpi=100)
    plt.close(fig)
