"""Free-energy landscapes of a CG model against its all-atom reference (experiments/cg_chignolin_md.py).

Reference: every CA-mapped frame at `md.temperature` in the model's training source (all splits:
the landscape is a property of the data, not a held-out score), one trajectory per replica.
CG: `md.copies` independent copies in one jax-md Langevin run (60 Å apart, beyond every cutoff),
half of them started from the folded structure and half from unfolded reference frames spread
over all replicas (RMSD above `md.unfolded_above`), for the model and for its
priors alone; and a LAMMPS run of the exported model (`md.lammps`), as shipped, started the
same way.

Compared, with the definitions of `molgen.cg.analysis`:
- 1D free energies of CA RMSD to the folded structure, end-to-end distance and Q;
- 2D free energies on (RMSD, Q) and on the two slowest TICA components of the CA pair distances,
  TICA fitted on the reference replicas;
- the folded fraction, RMSD < `md.folded_below`, with block-averaging errors (reference: blocks
  within each replica; CG: the copies as independent blocks);
- transitions core to core (RMSD < folded_below, > unfolded_above) per replica or copy;
- histogram overlaps sum(min(p, q)) on shared grids (1 = identical), and the same overlap between
  the two halves of each run (even and odd replicas or copies): for the reference the ceiling its
  own sampling allows, for a CG run whether its folded and unfolded starts agree.
Plots fes_1d.png, fes_2d_rmsd_q.png and fes_2d_tica.png, landscape.json and the CG trajectories
(traj_<run>.npz, one [F, R, 3] array per copy, Å) go to the workdir. `md.members="mean"` runs an
ensemble's mean energy (export.load_trained), in jax-md and LAMMPS.
"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

from molgen.cg import analysis, data, export, lammps, md, mdcath
from molgen.cg.production import ensure_model, read_dump
from molgen.core import loop

log = logging.getLogger("molgen")
KEYS = ("rmsd", "e2e", "q")
LABELS = {"rmsd": "CA RMSD to folded (Å)", "e2e": "end-to-end distance (Å)", "q": "Q (native contacts)"}


def reference_runs(source: str, domain: str, temperature: int) -> tuple[list, dict]:
    """The CA trajectories [F, R, 3] of every replica at `temperature` and the files' provenance."""
    trajs, prov = [], {}
    for f in data.source_files(source):
        if domain not in mdcath.domains(f):
            continue
        trajs += [r.positions for r in mdcath.read_cg(f, temperatures=(temperature,)) if r.domain == domain]
        prov[os.path.basename(f)] = json.loads(mdcath.provenance(f))
    if not trajs:
        raise ValueError(f"{source}: no frames of {domain} at {temperature} K for the reference")
    return trajs, prov


def observables(traj, folded, contacts) -> dict:
    pairs, r0 = contacts
    return {"rmsd": analysis.kabsch_rmsd(traj, folded), "q": analysis.fraction_native(traj, pairs, r0),
            "e2e": analysis.end_to_end(traj), "rg": analysis.radius_of_gyration(traj)}  # fmt: skip


def states(obs: list, folded_below: float, unfolded_above: float, n_blocks: int, frame_ps: float = 0.0) -> dict:
    """Folded fraction with its block error and the transitions of each trajectory's RMSD.
    n_blocks blocks per trajectory when there is one or a few; with many trajectories (copies)
    each is one block."""
    per, blocks = [], []
    for o in obs:
        f = (o["rmsd"] < folded_below).astype(np.float64)
        t = analysis.transitions(o["rmsd"], folded_below, unfolded_above)
        row = {"frames": len(f), "folded_fraction": float(f.mean()), **t}
        if frame_ps:
            row["ns"] = len(f) * frame_ps / 1000
        per.append(row)
        k = n_blocks if len(obs) < n_blocks else 1
        size = len(f) // k
        blocks += [f[i * size : (i + 1) * size].mean() for i in range(k)]
    blocks = np.asarray(blocks)
    return {"folded_fraction": float(np.mean(np.concatenate([(o["rmsd"] < folded_below) for o in obs]))),
            "folded_fraction_se": float(blocks.std(ddof=1) / np.sqrt(len(blocks))), "blocks": len(blocks),
            "folding": sum(p["folding"] for p in per), "unfolding": sum(p["unfolding"] for p in per),
            "trajectories": per}  # fmt: skip


def _hist(values, edges):
    h = np.histogramdd(values, bins=edges)[0] if values.ndim > 1 else np.histogram(values, edges)[0]
    return h / max(h.sum(), 1)


def _hists(o: dict, grids: dict) -> dict:
    h = {k: _hist(o[k], grids[k]) for k in KEYS}
    h["rmsd_q"] = _hist(np.stack([o["rmsd"], o["q"]], 1), grids["rmsd_q"])
    h["tica"] = _hist(np.asarray(o["tica"])[:, :2], grids["tica"])
    return h


def compare(named: dict, temperature: float, bins: int, workdir: str, reference: str = "all-atom",
            halves: dict | None = None) -> dict:  # fmt: skip
    """Overlaps of every entry of `named` ({name: concatenated observables incl. "tica" [F, 2]})
    with `named[reference]`, and the plots. `halves` ({name: (part a, part b)}): two disjoint
    parts of a run, whose overlap with each other (`halves_overlap_*`) measures its convergence:
    for the reference (replicas split in two) the ceiling its own sampling allows a model; for a
    CG run (copies from folded against copies from unfolded starts) whether it forgot its start."""
    out = {}
    grids = {}
    for k in KEYS:
        lo = min(float(np.min(o[k])) for o in named.values())
        hi = max(float(np.max(o[k])) for o in named.values())
        grids[k] = np.linspace(lo, hi + 1e-9, bins + 1)
    grids["rmsd_q"] = (grids["rmsd"], np.linspace(0, 1, bins + 1))
    t = np.concatenate([o["tica"] for o in named.values()])
    grids["tica"] = tuple(np.linspace(t[:, i].min(), t[:, i].max() + 1e-9, bins + 1) for i in range(2))
    hists = {name: _hists(o, grids) for name, o in named.items()}
    for name in named:
        if name != reference:
            out[name] = {f"overlap_{k}": analysis.overlap(hists[name][k], hists[reference][k]) for k in hists[name]}
    _plot(hists, grids, temperature, workdir, reference, out)
    for name, pair in (halves or {}).items():
        a, b = (_hists(h, grids) for h in pair)
        out.setdefault(name, {}).update({f"halves_overlap_{k}": analysis.overlap(a[k], b[k]) for k in a})
    return out


def _plot(hists, grids, temperature, workdir, reference, scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, k in zip(axes, KEYS, strict=True):
        centres = 0.5 * (grids[k][1:] + grids[k][:-1])
        for name, h in hists.items():
            f = analysis.free_energy(h[k], temperature)
            extra = "" if name == reference else f" (overlap {scores[name][f'overlap_{k}']:.2f})"
            ax.plot(
                centres, np.where(np.isfinite(f), f, np.nan), label=name + extra, lw=2 if name == reference else 1.3
            )
        ax.set(xlabel=LABELS[k], ylabel="F (kcal/mol)", title=f"{temperature:g} K")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "fes_1d.png"), dpi=100)
    plt.close(fig)
    for key, xl, yl in (("rmsd_q", LABELS["rmsd"], LABELS["q"]), ("tica", "TIC 1", "TIC 2")):
        fig, axes = plt.subplots(1, len(hists), figsize=(5 * len(hists), 4.2), squeeze=False)
        fs = {n: analysis.free_energy(h[key], temperature) for n, h in hists.items()}
        vmax = max(float(np.max(f[np.isfinite(f)])) for f in fs.values() if np.isfinite(f).any())
        ex = (grids[key][0][0], grids[key][0][-1], grids[key][1][0], grids[key][1][-1])
        for ax, (name, f) in zip(axes[0], fs.items(), strict=True):
            im = ax.imshow(np.where(np.isfinite(f), f, np.nan).T, origin="lower", aspect="auto", extent=ex, vmin=0,
                           vmax=vmax, cmap="viridis")  # fmt: skip
            title = name if name == reference else f"{name}: overlap {scores[name][f'overlap_{key}']:.2f}"
            ax.set(title=title, xlabel=xl, ylabel=yl)
            fig.colorbar(im, ax=ax, label="kcal/mol")
        fig.suptitle(f"free energy at {temperature:g} K")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, f"fes_2d_{key}.png"), dpi=100)
        plt.close(fig)


def _concat(obs: list) -> dict:
    return {k: np.concatenate([o[k] for o in obs]) for k in (*KEYS, "rg", "tica")}


def starts(folded, ref_trajs, ref_obs, copies: int, unfolded_above: float) -> list:
    """Starting CA structures of the CG copies: the folded structure for even copies; for odd
    ones reference frames with RMSD above `unfolded_above`, evenly spaced over all such frames of
    all replicas (the folded structure if there are none)."""
    unfolded = [t[o["rmsd"] > unfolded_above] for t, o in zip(ref_trajs, ref_obs, strict=True)]
    pool = np.concatenate(unfolded) if sum(len(u) for u in unfolded) else np.zeros((0, *folded.shape))
    picks = iter(np.linspace(0, len(pool) - 1, copies // 2).round().astype(int))
    return [folded if c % 2 == 0 or not len(pool) else pool[next(picks)] for c in range(copies)]


def sample(trained, meta, starts_list, mc, use_net: bool) -> list:
    """jax-md NVT of independent copies from `starts_list`; one [F, R, 3] trajectory per copy."""
    _, model, nn_params, prior_params, _ = trained
    n = len(starts_list[0])
    sys = md.make_system(meta, copies=len(starts_list), positions=np.stack(starts_list))
    frames, _, timing = md.run(model, nn_params, prior_params, sys, ensemble="nvt", temperature=float(mc.temperature),
                               dt=mc.dt, steps=mc.steps, gamma=1 / mc.damp, seed=mc.seed,
                               record_every=mc.record_every, use_net=use_net)  # fmt: skip
    log.info("jax-md %s: %d copies x %d steps in %.0f s", "model" if use_net else "priors", len(starts_list),
             mc.steps, timing["seconds"])  # fmt: skip
    trajs = frames.reshape(len(frames), len(starts_list), n, 3).transpose(1, 0, 2, 3)
    burn = int(len(frames) * mc.burn_in)
    kept, timing["nonfinite"] = finite_part([t[burn:] for t in trajs], "model" if use_net else "priors")
    return kept, timing


def finite_part(trajs: list, label: str) -> tuple[list, list]:
    """Each trajectory up to its first non-finite frame, and [{copy, frame}] of those cut (a
    blown-up copy is reported, not hidden; the analysis uses what it sampled before). A copy with
    no finite frame after burn-in is left out, which shifts the even/odd halves after it."""
    kept, bad = [], []
    for c, t in enumerate(trajs):
        ok = np.isfinite(t).all(axis=(1, 2))
        stop = len(t) if ok.all() else int(np.argmin(ok))
        if stop < len(t):
            bad.append({"copy": c, "frame": stop})
            log.warning("%s copy %d: non-finite positions from frame %d on; kept the %d frames before", label, c,
                        stop, stop)  # fmt: skip
        if stop:
            kept.append(t[:stop])
    if not kept:
        raise FloatingPointError(f"{label}: every copy was non-finite from its first frame: {bad[:4]}")
    return kept, bad


def train_and_evaluate(config, workdir: str):
    mc = config.md
    model_wd = ensure_model(config)
    trained = export.load_trained(model_wd, mc.members)
    cfg = trained[0]
    meta = export.system_metadata(cfg)
    protein = meta["proteins"][0]
    folded = np.asarray(protein["folded"])
    contacts = analysis.native_contacts(folded)
    temp = int(mc.temperature)
    ref_trajs, prov = reference_runs(cfg.data.source, protein["domain"], temp)
    stored = {p.get("frame_ps", 0.0) for p in prov.values()}
    frame_ps = float(mc.reference_frame_ps) or (stored.pop() if len(stored) == 1 else 0.0)
    ref_obs = [observables(t, folded, contacts) for t in ref_trajs]
    tica = analysis.tica([analysis.pair_distances(t) for t in ref_trajs], lag=mc.tica_lag, dim=2)
    report = {"model_workdir": model_wd, "members": trained[4]["members"], "seeds": trained[4]["seeds"],
              "temperature": temp, "folded_below": mc.folded_below,
              "unfolded_above": mc.unfolded_above, "reference_provenance": prov,
              "tica": {"lag_frames": mc.tica_lag, "timescales_ps": (tica["timescales"] * frame_ps).tolist()},
              "runs": {}}  # fmt: skip
    named, halves = {}, {}

    def add(name, trajs, obs, extra):
        if name != "all-atom":  # the CG trajectories (after burn-in, finite part), for further analysis
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # "CG model (jax-md)" -> cg_model_jax_md
            copies = {f"copy_{c}": t for c, t in enumerate(trajs)}
            np.savez_compressed(os.path.join(workdir, f"traj_{slug}.npz"), **copies)
        for o, t in zip(obs, trajs, strict=True):
            o["tica"] = analysis.tica_project(analysis.pair_distances(t), tica)
        named[name] = _concat(obs)
        if len(obs) > 1:
            halves[name] = (_concat(obs[0::2]), _concat(obs[1::2]))
        st = states(obs, mc.folded_below, mc.unfolded_above, mc.blocks, extra.pop("frame_ps", 0.0))
        report["runs"][name] = {**extra, **st}
        log.info("%s: folded fraction %.3f +- %.3f, %d folding / %d unfolding events", name, st["folded_fraction"],
                 st["folded_fraction_se"], st["folding"], st["unfolding"])  # fmt: skip

    add("all-atom", ref_trajs, ref_obs, {"frame_ps": frame_ps, "replicas": len(ref_trajs)})
    begin = starts(folded, ref_trajs, ref_obs, mc.copies, mc.unfolded_above)
    for name, use_net in (("CG model (jax-md)", True), ("priors only (jax-md)", False)):
        if not use_net and not mc.priors_only:
            continue
        trajs, timing = sample(trained, meta, begin, mc, use_net)
        add(name, trajs, [observables(t, folded, contacts) for t in trajs],
            {"copies": mc.copies, "steps": mc.steps, "dt_fs": mc.dt, "ns_per_copy": mc.steps * mc.dt * 1e-6,
             "wall_s": timing["seconds"], "nonfinite_copies": timing["nonfinite"]})  # fmt: skip
    run = None
    if mc.lammps.enabled:
        folder = export.write(model_wd, os.path.join(workdir, "export"), members=mc.members)
        run_dir = os.path.join(workdir, "lammps")
        try:
            run = lammps.run(folder, run_dir, ensemble="nvt", temperature=float(temp), steps=mc.lammps.steps,
                             dt=mc.dt, damp=mc.damp, seed=mc.seed, dump_every=mc.record_every,
                             copies=mc.lammps.copies, chunk=mc.lammps.chunk,
                             positions=np.stack(starts(folded, ref_trajs, ref_obs, mc.lammps.copies,
                                                       mc.unfolded_above)))  # fmt: skip
        except Exception as e:  # LAMMPS stops on a blown-up system ("Bond atoms missing"): report it, keep the rest
            log.warning("LAMMPS run failed, reported in landscape.json: %s", str(e)[-300:])
            report["runs"]["CG model (LAMMPS)"] = {"error": str(e)[-1000:], "log": os.path.join(run_dir, "log.lammps")}
    if run is not None:
        frames = read_dump(os.path.join(run_dir, "traj.lammpstrj"))
        n = protein["n_beads"]
        trajs = frames.reshape(len(frames), -1, n, 3).transpose(1, 0, 2, 3)[:, int(len(frames) * mc.burn_in) :]
        trajs, bad = finite_part(list(trajs), "LAMMPS")
        add("CG model (LAMMPS)", trajs, [observables(t, folded, contacts) for t in trajs],
            {"copies": mc.lammps.copies, "steps": mc.lammps.steps, "dt_fs": mc.dt, "steps_per_s": run["steps_per_s"],
             "ns_per_day": run["ns_per_day"], "nonfinite_copies": bad})  # fmt: skip
    scores = compare(named, float(temp), mc.bins, workdir, halves=halves)
    for name, s in scores.items():
        report["runs"][name].update(s)
        if name == "all-atom":
            continue
        ref_f = report["runs"]["all-atom"]["folded_fraction"]
        report["runs"][name]["folded_fraction_minus_reference"] = report["runs"][name]["folded_fraction"] - ref_f
    loop.write_json(workdir, "landscape.json", report)
    return report
