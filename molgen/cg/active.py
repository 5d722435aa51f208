"""Active learning for the CG force field: all-atom mean forces where the CG model goes.

A model trained on short all-atom runs near the folded state has seen nothing else; in long MD
it drifts where its data say nothing (on villin: packing the protein ever denser). Force
matching at a fixed CG configuration x is minimised by the conditional mean force E[F_CG | x]
whatever the distribution of the x in the data, so all-atom frames sampled with the CAs held
at a configuration the CG model visits are valid training data there. One round:

1. explore: jax-md Langevin MD of the trained model (`molgen.cg.md`) at each temperature, one
   copy from the folded structure or, with `copies` > 1, the landscape's starts
   (`landscape.starts`: even copies folded, odd ones from unfolded reference frames at the
   nearest temperature of the source), since a model can go wrong where only unfolded starts
   lead it;
2. pick `configs` CG configurations evenly over the copies after their first `burn_in`. A copy
   that blows up (non-finite positions) is cut `BLOWUP_MARGIN` frames before that: the frames
   leading into the blow-up are where the model most needs data;
3. backmap each (`simulate.backmap`): the model's all-atom train frame (nearest temperature)
   with the closest CAs, superposed, its CAs pulled onto the configuration by restraints with
   energy minimisation;
4. sample (`simulate.fixed_ca_samples`): `samples` frames of all-atom Langevin MD with the CAs
   fixed, after `equilibration_steps` (1 fs), written as one replica per configuration of an
   mdCATH-format file in `out`.

The backmapped start is strained, and its strain inflates the sampled mean force until the side
chains relax: at a round-1 villin configuration (4.5 Å from the fold) the RMS of the bead mean
force was 36.8 kcal/mol/Å after 0.2 ps and 24.9 after 2 ps (9.4 at a native frame). Hence the
2 ps default; 0.2 ps (round 1) gave targets that made the retrained model swell villin. GBn2
runs at about 15 steps/s on 2 CPU cores (OpenMM's CustomGBForce), so each configuration costs
about 3 minutes there.

`data.extra_train=<out>` then adds those frames to the training split (not to validation or
test, and not to the prior fit). Resumable: configurations already in the file are skipped,
the exploration trajectories are kept in `out/explore_<T>.npz`.

    python -m molgen.cg.active --model_workdir=runs/cg_villin --out=runs/cg_al/round1
    python -m molgen.main --config=experiments/cg_villin.py --workdir=runs/cg_villin_al1 \\
        --config.data.extra_train=runs/cg_al/round1 --config.stages.stage1.epochs=8
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import types

import h5py
import numpy as np
from absl import flags

from molgen.cg import analysis, data, export, landscape, mdcath, simulate, train
from molgen.core import cli

log = logging.getLogger("molgen.cg.active")


BLOWUP_MARGIN = 5  # frames kept out before a copy's first non-finite frame


def explore(trained, meta: dict, temperature: float, steps: int, record_every: int, seed: int, starts=None):
    """CG frames [C, F, R, 3] of jax-md Langevin MD (2 fs, damping 500 fs) of C copies from
    `starts` (default: one from the folded structure); NaN where a copy had blown up."""
    mc = types.SimpleNamespace(temperature=temperature, dt=2.0, steps=steps, damp=500.0, seed=seed,
                               record_every=record_every, burn_in=0.0)  # fmt: skip
    folded = np.asarray(meta["proteins"][0]["folded"])
    kept, timing = landscape.sample(trained, meta, [folded] if starts is None else starts, mc, use_net=True)
    n = max(1, steps // record_every)
    frames = np.full((len(kept), n, *folded.shape), np.nan, np.float32)
    for c, t in enumerate(kept):
        frames[c, : len(t)] = t
    return frames, folded


def picks(frames, configs: int, burn_in: float) -> list:
    """(copy, frame) of `configs` configurations spread evenly over the copies' finite frames
    after `burn_in` (a blown-up copy ends `BLOWUP_MARGIN` frames before its first non-finite one)."""
    spans = []
    for t in frames:
        ok = np.isfinite(t).all(axis=(1, 2))
        stop = len(t) if ok.all() else max(0, int(np.argmin(ok)) - BLOWUP_MARGIN)
        spans.append(np.arange(min(int(burn_in * len(t)), stop), stop))
    usable = [c for c, sp in enumerate(spans) if len(sp)]
    if not usable:
        raise FloatingPointError("active: every exploration copy blew up before its burn-in ended")
    out = []
    for c, share in zip(usable, np.array_split(np.arange(configs), len(usable)), strict=True):
        out += [(c, int(spans[c][i])) for i in np.linspace(0, len(spans[c]) - 1, len(share)).round().astype(int)]
    return out


def _copy_topology(src: str, out: str, domain: str):
    """A new all-atom mdCATH file at `out` with the domain's topology (no runs) copied from `src`
    (all-atom or CA-mapped: a mapped source's layout, provenance and force map stay behind, since
    the new runs hold all-atom forces that the source's map maps); atomic."""
    tmp = out + ".tmp"
    with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
        g.attrs.update({k: v for k, v in f.attrs.items() if k != "provenance"})
        if mdcath.is_mapped(src):
            g.attrs["layout"] = mdcath.LAYOUT
        dst = g.create_group(domain)
        dst.attrs.update(dict(f[domain].attrs))
        for key in f[domain].keys():
            if not key.isdigit() and key != "forceMap":
                f.copy(f[domain][key], dst, name=key)
    os.replace(tmp, out)


def _pool(cfg, domain: str, temperature: int):
    """(source file, all-atom train frames [P, N, 3] at the nearest temperature, that temperature) of the model's data
    (of a CA-mapped source: the train frames whose all-atom coordinates it kept)."""
    src = data.build(cfg.data, cfg.data.data_dir).as_data_source()["train"]
    split = train.load_split(src)
    keep = (split["domain"] == domain) & ~split["extra"]
    temps = sorted(set(split["temperature"][keep].tolist()))
    t = min(temps, key=lambda x: abs(x - temperature))
    keep &= split["temperature"] == t
    files = {d: f for f in data.source_files(cfg.data.source) for d in mdcath.domains(f)}
    path = files[domain]
    pairs = [(int(r), int(i)) for r, i in zip(split["replica"][keep], split["frame"][keep], strict=True)]
    kept = mdcath.atom_frames(path, domain, t)
    pairs = [p for p in pairs if kept is None or p in kept]
    if not pairs:
        raise ValueError(f"{path}: no train frame of {domain} at {t} K has all-atom coordinates to backmap from")
    return path, np.stack(mdcath.atom_coords_many(path, domain, t, pairs)), t


def run_round(model_workdir: str, out: str, temperatures=(320, 348), steps: int = 20_000, record_every: int = 100,
              burn_in: float = 0.25, configs: int = 24, samples: int = 16, steps_per_sample: int = 10,
              equilibration_steps: int = 2000, pool_stride: int = 2, seed: int = 0, copies: int = 1,
              unfolded_above: float = 3.0) -> dict:  # fmt: skip
    """One active-learning round (module docstring); returns and writes out/active_report.json.
    copies > 1: that many exploration copies from the landscape's starts (unfolded: CA RMSD above
    `unfolded_above` Å), with `configs` spread over them."""
    os.makedirs(out, exist_ok=True)
    trained = export.load_trained(model_workdir)
    cfg = trained[0]
    folder = os.path.join(out, "export")  # for its metadata (folded structure, species, masses)
    meta_path = pathlib.Path(folder) / "metadata.json"
    src = str(pathlib.Path(model_workdir).absolute())
    same = meta_path.exists() and json.loads(meta_path.read_text())["workdir"] == src
    if not same:  # a resumed round reuses its export
        export.write(model_workdir, folder, platforms=("cpu",))
    _, meta = export.load(folder)
    domain = meta["proteins"][0]["domain"]
    path = os.path.join(out, f"mdcath_dataset_{domain}.h5")
    report = {"model_workdir": os.path.abspath(model_workdir), "file": path, "temperatures": {}}
    for temp in temperatures:
        temp = int(temp)
        traj_path = os.path.join(out, f"explore_{temp}.npz")
        src_file, pool, t_data = _pool(cfg, domain, temp)
        if os.path.exists(traj_path):
            with np.load(traj_path) as z:
                frames, folded = z["frames"], z["folded"]
            frames = frames[None] if frames.ndim == 3 else frames  # a single-copy round written before copies
        else:
            t0 = time.time()
            begin = None
            if copies > 1:
                folded = np.asarray(meta["proteins"][0]["folded"])
                ref, _ = landscape.reference_runs(cfg.data.source, domain, t_data)
                rmsd = [{"rmsd": analysis.kabsch_rmsd(t, folded)} for t in ref]  # all that starts() reads
                begin = landscape.starts(folded, ref, rmsd, copies, unfolded_above)
            frames, folded = explore(trained, meta, temp, steps, record_every, seed, begin)
            np.savez(traj_path, frames=frames, folded=folded)
            log.info("explored %d K: %d copies x %d steps in %.0f s", temp, len(frames), steps, time.time() - t0)
        pick = picks(frames, configs, burn_in)
        finite = frames[np.isfinite(frames).all(axis=(2, 3))]
        obs_all = analysis.observables(finite, folded)
        obs = analysis.observables(np.stack([frames[c, i] for c, i in pick]), folded)
        pool = pool[::pool_stride]
        if not os.path.exists(path):
            _copy_topology(src_file, path, domain)
        with h5py.File(path, "r") as f:
            done = set(f[domain][str(temp)].keys()) if str(temp) in f[domain] else set()
        text = simulate._stored_pdb(src_file, domain)
        system, top = simulate.fixed_ca_system(text, domain)
        rows, failed = [], []
        for k, (c, i) in enumerate(pick):
            if str(k) in done:
                continue
            t0 = time.time()
            try:
                bm = simulate.backmap(text, domain, pool, frames[c, i], seed=seed + k)
                coords, forces = simulate.fixed_ca_samples(system, top, bm["coords"], temp, samples, steps_per_sample,
                                                           equilibration_steps, seed=seed + 1000 * temp + k,
                                                           minimize=200)  # fmt: skip
            except Exception as e:  # openmm.OpenMMException (NaN) or moved CAs: skip this configuration
                failed.append({"config": k, "explore_copy": c, "explore_frame": i, "error": str(e)[:200]})
                log.warning("%d K configuration %d (copy %d, frame %d) skipped: %s", temp, k, c, i, e)
                continue
            extra = {"cg_target": frames[c, i], "explore_frame": i, "explore_copy": c,
                     "pool_ca_rmsd": bm["pool_ca_rmsd"]}  # fmt: skip
            mdcath.write_replica(path, domain, temp, k, coords, forces, np.zeros(3), extra)
            rows.append({"config": k, "explore_copy": c, "explore_frame": i, "rmsd": float(obs["rmsd"][k]),
                         "q": float(obs["q"][k]),
                         "pool_ca_rmsd": bm["pool_ca_rmsd"], "restraint_deviation": bm["restraint_deviation"],
                         "seconds": time.time() - t0})  # fmt: skip
            log.info(
                "%d K configuration %d/%d (copy %d, frame %d, RMSD %.2f Å, Q %.2f): backmapped from %.2f Å, %.0f s",
                temp,
                k + 1,
                len(pick),
                c,
                i,
                obs["rmsd"][k],
                obs["q"][k],
                bm["pool_ca_rmsd"],
                rows[-1]["seconds"],
            )
        report["temperatures"][str(temp)] = {
            "explore_steps": int(steps), "copies": len(frames), "frames": int(frames.shape[1]),
            "blown_up_copies": [c for c, t in enumerate(frames) if not np.isfinite(t).all()],
            "picked": [list(p) for p in pick], "rmsd_mean": float(obs_all["rmsd"].mean()),
            "q_mean": float(obs_all["q"].mean()), "rg_mean": float(obs_all["rg"].mean()), "new_configs": rows,
            "failed_configs": failed,
        }  # fmt: skip
    report.update(samples=samples, steps_per_sample=steps_per_sample, equilibration_steps=equilibration_steps)
    with open(os.path.join(out, "active_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: other modules share names such as --out)."""
    flags.DEFINE_string("model_workdir", None, "the trained CG workdir to explore with", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "folder of the new all-atom frames (mdCATH format)", required=True, flag_values=fv)
    flags.DEFINE_list("temperatures", ["320", "348"], "exploration temperatures (K)", flag_values=fv)
    flags.register_validator("temperatures", lambda v: all(t.isdigit() for t in v), "needs whole K", flag_values=fv)
    flags.DEFINE_integer("steps", 20_000, "CG MD steps (2 fs) per temperature", flag_values=fv)
    flags.DEFINE_integer("configs", 24, "configurations picked per temperature", flag_values=fv)
    flags.DEFINE_integer("samples", 16, "all-atom frames per configuration", flag_values=fv)
    flags.DEFINE_integer("equilibration_steps", 2000, "fixed-CA MD steps (1 fs) before sampling", flag_values=fv)
    flags.DEFINE_integer("copies", 1, "exploration copies per temperature (>1: half folded, half unfolded starts)",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    return fv


def _cli(a, argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # absl set one up
    temps = [int(t) for t in a.temperatures]
    run_round(a.model_workdir, a.out, temps, a.steps, configs=a.configs, samples=a.samples,
              equilibration_steps=a.equilibration_steps, seed=a.seed, copies=a.copies)  # fmt: skip


def main(argv=None):
    """The CLI in this process: main(["--model_workdir=X", "--out=Y"]); None: from the shell."""
    cli.run("molgen.cg.active", _flags, _cli, argv)


if __name__ == "__main__":
    main()
