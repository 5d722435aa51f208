"""CG MD from a trained workdir: export, LAMMPS checks and runs, analysis against the reference.

    python -m molgen.main --config=experiments/cg_villin_md.py --workdir=runs/cg_villin_md

Steps, each writing into the workdir:
1. `export/`: the jax.export artifact of the model in `md.model_workdir` (trained first with
   `md.model_experiment` if that workdir has no finished run).
2. `force_check.json`: forces LAMMPS receives through `fix external` against the JAX model's own
   (training code path, jax-md neighbour list) on `force_check.configs` configurations from the
   test split, half of them after LAMMPS re-sorted its atoms.
3. `nve/`: LAMMPS NVE; total-energy drift per ns per bead from a linear fit (`nve.png`).
4. `nvt_<T>/` for each `nvt.temperatures`: LAMMPS Langevin NVT; bond lengths, RMSD, Rg and Q
   over the dumped frames (`nvt_<T>.png`), and, where the training data hold that temperature,
   the free-energy comparison with the CG-mapped all-atom frames (`fes_<T>.png`, overlap scores).
`md_report.json` gathers the figures.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from molgen.cg import analysis, data, energy, export, lammps, priors, train
from molgen.core import loop

log = logging.getLogger("molgen")


def ensure_model(config) -> str:
    wd = os.path.abspath(os.path.expanduser(config.md.model_workdir))
    if not os.path.exists(os.path.join(wd, "evaluation.json")):
        if not config.md.model_experiment:
            raise FileNotFoundError(f"md.model_workdir={wd} holds no finished CG run and md.model_experiment is empty")
        module, _, variant = config.md.model_experiment.partition(":")
        cfg = importlib.import_module(module).get_config(*([variant] if variant else []))
        log.info("no trained model in %s: training %s first", wd, config.md.model_experiment)
        os.makedirs(wd, exist_ok=True)
        (pathlib.Path(wd) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        train.train_and_evaluate(cfg, wd)
    return wd


def read_dump(path) -> np.ndarray:
    """Frames [F, N, 3] of a LAMMPS custom dump sorted by id (columns id mol type xu yu zu)."""
    frames, lines = [], pathlib.Path(path).read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("ITEM: NUMBER OF ATOMS"):
            n = int(lines[i + 1])
            body = lines[i + 7 : i + 7 + n]  # after the box bounds and the ATOMS header
            a = np.asarray([row.split() for row in body], np.float64)
            x = np.empty((n, 3))
            x[a[:, 0].astype(int) - 1] = a[:, 3:6]
            frames.append(x)
            i += 7 + n
        else:
            i += 1
    return np.stack(frames)


def force_check(config, workdir, folder, trained, splits) -> dict:
    """Max |F_lammps - F_jax| / max |F_jax| per configuration; `trained`: export.load_trained's."""
    cfg, _, nnp, pp, _ = trained
    test = splits["test"]
    rng = np.random.default_rng(config.md.seed)
    picks = rng.choice(len(test["positions"]), size=min(config.md.force_check.configs, len(test["positions"])),
                       replace=False)  # fmt: skip
    full = None
    rows = []
    for k, i in enumerate(picks):
        m = test["mask"][i]
        x = test["positions"][i][m]
        resort = k % 2 == 1  # half: one MD step with LAMMPS sorting its atoms every step
        run_dir = pathlib.Path(workdir) / "force_check" / f"{k:02d}"
        xl, fl, tags = lammps.received_forces(folder, run_dir, x, seed=k, steps=int(resort),
                                              sort_every=1 if resort else 1000)  # fmt: skip
        if full is None:
            full = energy.make_model(cfg, len(x), len(x) * (len(x) - 1), x)
        _, fj, _ = energy.frame_forces(full, nnp, priors.as_jax(pp), jnp.asarray(xl, jnp.float32),
                                      jnp.asarray(test["species"][i][m]), jnp.ones(len(x), bool))  # fmt: skip
        fj = np.asarray(fj, np.float64)
        rel = float(np.abs(fl - fj).max() / np.abs(fj).max())
        rows.append({"frame": int(i), "resorted": resort, "reordered": bool(np.any(tags != np.arange(1, len(x) + 1))),
                     "max_rel_error": rel, "max_abs_error": float(np.abs(fl - fj).max())})  # fmt: skip
    out = {"configs": len(rows), "max_rel_error": max(r["max_rel_error"] for r in rows),
           "reordered": sum(r["reordered"] for r in rows), "rows": rows}  # fmt: skip
    loop.write_json(workdir, "force_check.json", out)
    log.info("force check: %d configurations (%d reordered by LAMMPS), max relative error %.2e",
             out["configs"], out["reordered"], out["max_rel_error"])  # fmt: skip
    return out


def nve_drift(run: dict, beads: int, path=None) -> dict:
    t = np.asarray([r["time"] for r in run["thermo"]]) * 1e-6  # fs -> ns
    e = np.asarray([r["etotal"] for r in run["thermo"]])
    slope = np.polyfit(t, e, 1)[0] if len(t) > 2 else float("nan")
    out = {"drift_kcal_per_mol_per_ns_per_bead": float(slope / beads), "etotal_std": float(np.std(e)),
           "ke_mean": float(np.mean([r["ke"] for r in run["thermo"]])), "steps": run["steps"],
           "dt_fs": run["dt_fs"]}  # fmt: skip
    if path is not None:
        _plot_energy(run["thermo"], path)
    return out


def _plot_energy(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["time"] / 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ("etotal", "pe", "ke"):
        ax.plot(t, [r[k] for r in rows], label=k)
    ax.set(xlabel="time (ps)", ylabel="kcal/mol", title="LAMMPS NVE with the exported CG model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_series(obs, bonds, dt_ps, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(obs["rmsd"])) * dt_ps
    fig, axes = plt.subplots(1, 4, figsize=(20, 3.8))
    for ax, k, label in zip(axes[:3], ("rmsd", "rg", "q"), ("RMSD to folded (Å)", "Rg (Å)", "Q"), strict=True):
        ax.plot(t, obs[k], lw=0.8)
        ax.set(xlabel="time (ps)", ylabel=label)
    axes[3].hist(bonds.reshape(-1), bins=60)
    axes[3].axvline(3.0, color="k", ls="--")
    axes[3].axvline(4.6, color="k", ls="--")
    axes[3].set(xlabel="bond length (Å)", title="bonds (3.0-4.6 Å marked)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_and_evaluate(config, workdir: str):
    mc = config.md
    model_wd = ensure_model(config)
    folder = export.write(model_wd, os.path.join(workdir, "export"))
    _, meta = export.load(folder)
    protein = meta["proteins"][0]
    folded = np.asarray(protein["folded"])
    trained = export.load_trained(model_wd)
    cfg = trained[0]
    src = data.build(cfg.data, cfg.data.data_dir).as_data_source()
    splits = {s: train.load_split(src[s]) for s in data.SPLITS}
    report = {"export": str(folder), "model_workdir": model_wd, "protein": protein["domain"],
              "beads": protein["n_beads"]}  # fmt: skip
    if mc.force_check.enabled:
        fc = force_check(config, workdir, folder, trained, splits)
        report["force_check"] = {k: v for k, v in fc.items() if k != "rows"}
    common = dict(dt=mc.dt, damp=mc.damp, thermo_every=mc.thermo_every, chunk=mc.chunk)
    if mc.nve.enabled:
        run = lammps.run(folder, os.path.join(workdir, "nve"), ensemble="nve", temperature=mc.nve.temperature,
                         steps=mc.nve.steps, seed=mc.seed, dump_every=mc.nve.steps, positions=folded,
                         **common)  # fmt: skip
        report["nve"] = nve_drift(run, protein["n_beads"], os.path.join(workdir, "nve.png"))
        report["nve"]["ns_per_day"] = run["ns_per_day"]
        log.info("NVE %d steps at %g fs: drift %.4g kcal/mol/ns/bead", mc.nve.steps, mc.dt,
                 report["nve"]["drift_kcal_per_mol_per_ns_per_bead"])  # fmt: skip
    all_frames = {s: splits[s] for s in data.SPLITS}
    for temp in mc.nvt.temperatures:
        name = f"nvt_{int(temp)}"
        run_dir = os.path.join(workdir, name)
        run = lammps.run(folder, run_dir, ensemble="nvt", temperature=float(temp), steps=mc.nvt.steps,
                         seed=mc.seed, dump_every=mc.nvt.dump_every, positions=folded, **common)  # fmt: skip
        frames = read_dump(os.path.join(run_dir, "traj.lammpstrj"))
        bonds = analysis.bond_lengths(frames, protein["chains"])
        obs = analysis.observables(frames, folded)
        res = {"steps": run["steps"], "dt_fs": mc.dt, "ns": run["steps"] * mc.dt * 1e-6,
               "ns_per_day": run["ns_per_day"], "steps_per_s": run["steps_per_s"],
               "callback_share": run["callback_share"], "frames": len(frames),
               "bond_min": float(bonds.min()), "bond_max": float(bonds.max()),
               "bonds_within_3_0_4_6": bool(bonds.min() >= 3.0 and bonds.max() <= 4.6),
               "temperature_mean": float(np.mean([r["temp"] for r in run["thermo"][1:]])),
               "rmsd_mean": float(obs["rmsd"].mean()), "rg_mean": float(obs["rg"].mean()),
               "q_mean": float(obs["q"].mean()), "finite": bool(np.isfinite(frames).all())}  # fmt: skip
        np.savez(os.path.join(run_dir, "observables.npz"), **obs)
        _plot_series(obs, bonds, mc.nvt.dump_every * mc.dt * 1e-3, os.path.join(workdir, f"{name}.png"),
                     f"LAMMPS NVT {temp:g} K, {res['ns']:.2f} ns at {mc.dt:g} fs")  # fmt: skip
        ref = _reference_frames(all_frames, protein["domain"], int(temp))
        if ref is not None:
            ref_obs = analysis.observables(ref, folded)
            burn = int(len(frames) * mc.nvt.burn_in)
            res["comparison"] = analysis.compare({k: v[burn:] for k, v in obs.items()}, ref_obs, float(temp),
                                                 os.path.join(workdir, f"fes_{int(temp)}.png"))  # fmt: skip
            res["comparison"]["reference_frames"] = len(ref)
        report[name] = res
        log.info("%s: %.2f ns, %.1f ns/day, bonds %.2f-%.2f Å, RMSD %.2f Å, Q %.2f%s", name, res["ns"],
                 res["ns_per_day"], res["bond_min"], res["bond_max"], res["rmsd_mean"], res["q_mean"],
                 f", overlap {res['comparison']['overlap_rmsd_q']:.3f}" if "comparison" in res else "")  # fmt: skip
    loop.write_json(workdir, "md_report.json", report)
    return report


def _reference_frames(splits, domain, temperature):
    xs = [s["positions"][(s["domain"] == domain) & (s["temperature"] == temperature)] for s in splits.values()]
    masks = [s["mask"][(s["domain"] == domain) & (s["temperature"] == temperature)] for s in splits.values()]
    x, m = np.concatenate(xs), np.concatenate(masks)
    if not len(x):
        return None
    return x[:, m[0]]
