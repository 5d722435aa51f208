"""Shipping the CG model: jax.export artifact, loading without molgen, LAMMPS fix external,
jax-md MD, trajectory analysis, bad-input errors, and the MD experiment through the CLI."""

import json
import shutil
import subprocess
import sys
import time

import cg_run
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.cg import analysis, data, energy, export, lammps, md, priors, train


@pytest.fixture(scope="module")
def artifact(cg_trained, tmp_path_factory):
    return export.write(str(cg_trained), str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def trained(cg_trained):
    cfg, model, nnp, pp, _ = export.load_trained(str(cg_trained))
    src = data.build(cfg.data, cfg.data.data_dir).as_data_source()
    test = train.load_split(src["test"])
    return cfg, model, nnp, pp, test


def _jax_forces(trained, x, species):
    cfg, _, nnp, pp, _ = trained
    full = energy.make_model(cfg, len(x), len(x) * (len(x) - 1), x)
    out = energy.frame_forces(full, nnp, priors.as_jax(pp), jnp.asarray(x, jnp.float32), jnp.asarray(species),
                             jnp.ones(len(x), bool))  # fmt: skip
    return float(out[0]), np.asarray(out[1], np.float64)


def test_artifact_files_and_metadata(artifact):
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["units"]["style"] == "real" and meta["cutoff"] > 0 and "cpu" in meta["platforms"]
    assert meta["species"]["ALA"] == 0 and len(meta["species"]) == 20 and meta["species_masses"]["GLY"] > 50
    p = meta["proteins"][0]
    assert p["domain"] == "villin" and p["n_beads"] == len(p["folded"]) == len(p["resnames"])
    assert "stablehlo" in (artifact / "model.mlir").read_text()[:20000]


LOADER = """
import sys
sys.modules["molgen"] = None  # molgen must not be importable here
try:
    import molgen  # noqa
    raise SystemExit("molgen was importable")
except ImportError:
    pass
import hashlib, json, pathlib
import jax, numpy as np
folder = pathlib.Path(sys.argv[1])
meta = json.loads((folder / "metadata.json").read_text())
blob = (folder / "model.jax").read_bytes()
assert hashlib.sha256(blob).hexdigest() == meta["sha256"]
fn = jax.export.deserialize(bytearray(blob))
a = dict(np.load(sys.argv[2]))
topo = {k: a[k] for k in ("bonds", "angles", "dihedrals", "repulsive", "excluded", "excluded_sep")}
e, f, w = fn.call(a["positions"], a["species"], a["senders"], a["receivers"], topo)
np.savez(sys.argv[3], energy=np.asarray(e), forces=np.asarray(f), virial=np.asarray(w))
"""


def test_artifact_loads_with_jax_only_and_matches_the_model(artifact, trained, tmp_path):
    test = trained[4]
    m = test["mask"][0]
    x, s = test["positions"][0][m], test["species"][0][m]
    snd, rcv = lammps.neighbour_pairs(x, json.loads((artifact / "metadata.json").read_text())["cutoff"])
    np.savez(tmp_path / "in.npz", positions=x.astype(np.float32), species=s.astype(np.int32), senders=snd,
             receivers=rcv, **export.topology_arrays([len(x)]))  # fmt: skip
    (tmp_path / "loader.py").write_text(LOADER)
    res = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(artifact), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in cg_run.env().items() if k != "PYTHONPATH"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    e, f = _jax_forces(trained, x, s)
    assert np.isclose(float(out["energy"]), e, rtol=1e-5)
    assert np.abs(out["forces"] - f).max() <= 1e-4 * np.abs(f).max()
    assert out["virial"].shape == (3, 3)


def test_lammps_receives_the_model_forces_with_reordered_atoms(artifact, trained, tmp_path):
    test = trained[4]
    for k, i in enumerate((0, 1, 2, 3)):
        m = test["mask"][i]
        x, s = test["positions"][i][m], test["species"][i][m]
        resort = k >= 2  # one step with LAMMPS sorting its atoms every step
        xl, fl, tags = lammps.received_forces(artifact, tmp_path / f"c{k}", x, seed=k, steps=int(resort),
                                              sort_every=1 if resort else 1000)  # fmt: skip
        assert np.any(tags != np.arange(1, len(x) + 1)), "LAMMPS kept the tag order: nothing was tested"
        if not resort:
            np.testing.assert_allclose(xl, x - x.mean(0), atol=1e-5)  # the system is centred
        _, fj = _jax_forces(trained, xl, s)
        assert np.abs(fl - fj).max() <= 1e-4 * np.abs(fj).max()


def test_lammps_nve_conserves_energy_and_writes_its_files(artifact, tmp_path, monkeypatch):
    seconds = []  # every model evaluation, timed independently of lammps.run's own clock
    model_call = lammps.ForceField.__call__

    def timed(self, positions):
        t = time.perf_counter()
        out = model_call(self, positions)
        seconds.append(time.perf_counter() - t)
        return out

    monkeypatch.setattr(lammps.ForceField, "__call__", timed)
    t0 = time.perf_counter()
    run = lammps.run(artifact, tmp_path, ensemble="nve", temperature=300.0, dt=1.0, steps=300, thermo_every=10,
                     chunk=100, dump_every=100)  # fmt: skip
    outside = time.perf_counter() - t0
    e = np.asarray([r["etotal"] for r in run["thermo"]])
    ke = np.asarray([r["ke"] for r in run["thermo"]])
    assert len(e) == 31 and np.isfinite(e).all()
    assert np.std(e) < 0.02 * np.mean(ke)  # fluctuations small against the kinetic energy
    for name in ("in.lammps", "log.lammps", "system.data", "traj.lammpstrj", "run.json"):
        assert (tmp_path / name).exists(), name
    assert "run 300" in (tmp_path / "in.lammps").read_text()
    # against our own clock: the callback time is the 300 steps' model calls (not the setup's
    # call, which compiles: seconds, against ~2 ms a step) plus a little bookkeeping each, and
    # the timed window (wall_s) holds them but not the setup
    assert len(seconds) == 1 + 300  # the setup's force evaluation, then one per step
    steps = sum(seconds[1:])
    assert steps <= run["callback_s"] <= steps + 1e-3 * 300
    assert run["callback_s"] <= run["wall_s"] <= outside - seconds[0]
    assert run["callback_share"] == pytest.approx(run["callback_s"] / run["wall_s"])


def test_bad_artifacts_and_data_files_give_clear_errors(artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    blob = bytearray((broken / "model.jax").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (broken / "model.jax").write_bytes(bytes(blob))
    with pytest.raises(export.ExportError, match="model.jax: content hash"):
        export.load(broken)
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(export.ExportError, match="metadata.json: cannot read"):
        export.load(broken)

    meta = json.loads((artifact / "metadata.json").read_text())
    p = meta["proteins"][0]
    x = np.asarray(p["folded"])
    other = dict(meta["species"], ALA=meta["species"]["GLY"], GLY=meta["species"]["ALA"])  # another species map
    write = lambda path, n, sp: lammps.write_data(path, x[:n], p["resnames"][:n], sp, meta["species_masses"],  # noqa: E731
                                                   [n])  # fmt: skip
    write(tmp_path / "other_map.data", len(x), other)
    with pytest.raises(export.ExportError, match="species map differs.*ALA"):
        lammps.run(artifact, tmp_path / "r1", data_file=tmp_path / "other_map.data", steps=0)
    write(tmp_path / "short.data", len(x) - 1, meta["species"])
    with pytest.raises(lammps.LammpsError, match=f"short.data: {len(x) - 1} beads.*{len(x)} beads per copy"):
        lammps.run(artifact, tmp_path / "r2", data_file=tmp_path / "short.data", steps=0)


def test_metadata_describes_topology_padding_and_outputs(artifact, tmp_path):
    """Format v2 carries what a user without molgen needs; a v1 artifact still loads."""
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["format"] == export.FORMAT == "molgen-cg-export-v2"
    p = meta["proteins"][0]
    want = export.topology_arrays(p["chains"])
    for k in export.TOPOLOGY_KEYS:
        np.testing.assert_array_equal(np.asarray(p["topology"][k]).reshape(want[k].shape), want[k], err_msg=k)
    rule = meta["topology_rule"]
    assert rule["min_repulsive_separation"] == priors.MIN_REPULSIVE_SEP
    assert rule["excluded_separations"] == list(priors.EXCLUDED_SEPS)
    # the rule in numbers rebuilds the arrays (one chain)
    i, j = np.triu_indices(p["n_beads"], 1)
    sep = j - i
    assert len(p["topology"]["repulsive"]) == int((sep >= rule["min_repulsive_separation"]).sum())
    lo, hi = rule["excluded_separations"][0], rule["excluded_separations"][-1]
    assert len(p["topology"]["excluded"]) == int(((sep >= lo) & (sep <= hi)).sum())
    assert meta["pairs"]["bucket"] == lammps.BUCKET and "padding" in meta["pairs"]["convention"]
    assert set(meta["outputs"]) == {"energy", "forces", "virial"} and "LAMMPS" in meta["outputs"]["virial"]
    old = tmp_path / "v1"
    shutil.copytree(artifact, old)
    (old / "metadata.json").write_text(json.dumps(dict(meta, format="molgen-cg-export-v1")))
    export.load(old)
    (old / "metadata.json").write_text(json.dumps(dict(meta, format="molgen-cg-export-v0")))
    with pytest.raises(export.ExportError, match="metadata.json: format 'molgen-cg-export-v0'"):
        export.load(old)


BLOCKER = """
import runpy, sys
class NoMolgen:
    def find_spec(self, name, path=None, target=None):
        if name == "molgen" or name.startswith("molgen."):
            raise ImportError(name + " is blocked: run_exported.py must not need molgen")
sys.meta_path.insert(0, NoMolgen())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_run_exported_needs_nothing_from_molgen(artifact, tmp_path):
    """launch/lammps/run_exported.py with molgen unimportable: 500 NVE steps of two copies,
    energy conserved, at most 3 compilations (counted in jax's compilation log)."""
    (tmp_path / "blocker.py").write_text(BLOCKER)
    script = cg_run.ROOT / "launch" / "lammps" / "run_exported.py"
    env = {k: v for k, v in cg_run.env().items() if k != "PYTHONPATH"}
    env["JAX_LOG_COMPILES"] = "1"
    res = subprocess.run([sys.executable, str(tmp_path / "blocker.py"), str(script), str(artifact), "--copies=2",
                          "--ensemble=nve", "--steps=500", "--dt=1", "--thermo=10", f"--out={tmp_path / 'run'}"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    compiles = [x for x in res.stderr.splitlines() if "Finished XLA compilation of jit(call)" in x]
    assert 1 <= len(compiles) <= 3, res.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["copies"] == 2 and run["compilations"] == len(compiles) and run["steps"] == 500
    e = np.asarray([r["etotal"] for r in run["thermo"]])
    assert len(e) == 51 and np.isfinite(e).all()
    assert np.std(e) < 0.02 * run["ke_mean"] and abs(e[-1] - e[0]) < 0.02 * run["ke_mean"]
    assert abs(run["drift_kcal_mol_ns_bead"]) < 1.0
    # the data file it wrote (atoms in shuffled order) read back: the same system, its energy
    again = subprocess.run([sys.executable, str(tmp_path / "blocker.py"), str(script), str(artifact),
                            f"--data={tmp_path / 'run' / 'system.data'}", "--ensemble=nve", "--steps=20", "--dt=1",
                            "--thermo=10", f"--out={tmp_path / 'again'}"],
                           cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "again" / "run.json").read_text())
    assert rerun["beads"] == run["beads"] and rerun["thermo"][0]["pe"] == pytest.approx(run["thermo"][0]["pe"], 1e-5)
    # a data file that is not copies of the protein is refused, naming the file
    (tmp_path / "bad.data").write_text((tmp_path / "run" / "system.data").read_text().replace(" atoms", " atomz", 1))
    bad = subprocess.run([sys.executable, str(tmp_path / "blocker.py"), str(script), str(artifact),
                          f"--data={tmp_path / 'bad.data'}", f"--out={tmp_path / 'bad'}"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode != 0 and "bad.data" in bad.stderr


def test_jax_md_nve_conserves_energy_and_python_loop_runs(artifact, trained):
    _, model, nnp, pp, _ = trained
    meta = json.loads((artifact / "metadata.json").read_text())
    system = md.make_system(meta, copies=2)
    frames, energies, timing = md.run(model, nnp, pp, system, ensemble="nve", dt=1.0, steps=200, record_every=20)
    assert frames.shape == (10, len(system.positions), 3) and np.isfinite(frames).all()
    total = energies.sum(1)
    assert np.std(total) < 0.02 * energies[:, 1].mean()
    x, seconds = md.python_loop(md.jitted_forces(model, nnp, pp, system), system, dt=1.0, steps=5)
    assert np.isfinite(x).all() and seconds > 0


def test_nve_check_cli_writes_its_report(cg_trained, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(cg_trained, wd)
    md.main([f"--workdir={wd}", "--steps=200", "--dt=1"])  # the CLI's own entry, in this process
    rep = json.loads((wd / "nve_check.json").read_text())
    assert rep["steps"] == 200 and rep["dt_fs"] == 1.0 and len(rep["largest_jumps"]) == 3
    assert np.isfinite(rep["drift_kcal_per_mol_per_ns_per_bead"]) and rep["etotal_range"] < 5.0
    assert rep["temperature"]["first"] > 100 and rep["packing_folded"]["close_pairs"] > 0
    assert rep["packing_last"]["closest"] > 2.0  # no bead pair collapsed in 0.2 ps


def test_analysis_against_hand_values():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 3)) * 5
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    moved = ref @ q.T + np.array([3.0, -1.0, 2.0])
    shifted = ref.copy()
    shifted[0] += np.array([3.0, 0.0, 0.0])  # one bead off by 3 Å: RMSD <= 3 / sqrt(20)
    r = analysis.kabsch_rmsd(np.stack([moved, shifted]), ref)
    assert r[0] < 1e-6 and 0 < r[1] <= 3 / np.sqrt(20) + 1e-9
    rg = analysis.radius_of_gyration(ref[None])[0]
    assert np.isclose(rg, np.sqrt(np.mean(np.sum((ref - ref.mean(0)) ** 2, -1))))
    pairs, r0 = analysis.native_contacts(ref, cutoff=8.0)
    assert np.all(pairs[:, 1] - pairs[:, 0] >= 4) and np.all(r0 < 8.0)
    qn = analysis.fraction_native(ref[None], pairs, r0)[0]
    assert np.isclose(qn, np.mean(1 / (1 + np.exp(5.0 * (r0 - 1.2 * r0)))))
    p = np.array([[0.5, 0.5], [0.0, 0.0]])
    assert analysis.overlap(p, p) == 1.0 and analysis.overlap(p, p[::-1]) == 0.0
    assert analysis.overlap(p, np.array([[1.0, 0.0], [0.0, 0.0]])) == 0.5


MD_CLI = [sys.executable, "-m", "molgen.main", "--config=experiments/cg_villin_md.py:quick"]


@pytest.mark.slow  # ~2 min; keeps the default suite inside its 20-minute budget
def test_md_experiment_cli(cg_trained, tmp_path):
    wd = tmp_path / "md"
    args = [*MD_CLI, f"--workdir={wd}",
            f"--config.md.model_workdir={cg_trained}", "--config.md.force_check.configs=2", "--config.md.nve.steps=200",
            "--config.md.nvt.steps=400", "--config.md.nvt.dump_every=20", "--config.md.chunk=200"]  # fmt: skip
    res = subprocess.run(args, cwd=cg_run.ROOT, env=cg_run.env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads((wd / "md_report.json").read_text())
    assert rep["force_check"]["max_rel_error"] < 1e-4 and rep["force_check"]["reordered"] == 2
    assert np.isfinite(rep["nve"]["drift_kcal_per_mol_per_ns_per_bead"])
    assert rep["nvt_300"]["finite"] and rep["nvt_300"]["frames"] == 21
    assert 0 <= rep["nvt_320"]["comparison"]["overlap_rmsd_q"] <= 1
    for name in ("nve.png", "nvt_300.png", "fes_320.png", "export/model.jax", "nvt_320/traj.lammpstrj"):
        assert (wd / name).exists(), name


def test_md_experiment_names_a_missing_model_run(tmp_path):
    bad = [f"--workdir={tmp_path / 'md2'}", "--config.md.model_workdir=/nonexistent", "--config.md.model_experiment="]
    res = subprocess.run(MD_CLI + bad,
                         cwd=cg_run.ROOT, env=cg_run.env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode != 0 and "md.model_workdir=/nonexistent holds no finished CG run" in res.stderr
