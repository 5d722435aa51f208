"""Chignolin end to end through the real CLI on the committed reference data: the tiny model
(stored force map, 340 K frames only), its relative-entropy fine-tuning, and the fine-tuned
model's landscape against the all-atom reference."""

import json
import subprocess
import sys

import cg_run
import jax
import numpy as np
import pytest

CLI = [sys.executable, "-m", "molgen.main"]


@pytest.mark.slow  # ~5.5 min; keeps the default suite inside its 20-minute budget (pytest -m slow runs it)
def test_tiny_chignolin_model_relent_and_landscape(tmp_path):
    model = tmp_path / "model"
    train = [*CLI, "--config=experiments/cg_chignolin.py:tiny", f"--workdir={model}",
             f"--config.data.data_dir={tmp_path / 'tfds'}"]  # fmt: skip
    res = subprocess.run(train, cwd=cg_run.ROOT, env=cg_run.env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json.loads((model / "evaluation.json").read_text())
    assert ev["frames"] > 0 and ev["model"]["mse"] > 0 and ev["priors_only"]["mse"] > 0
    base_mse = ev["model"]["mse"]
    rem = tmp_path / "rem"
    cmd = [*CLI, "--config=experiments/cg_chignolin_rem.py:tiny", f"--workdir={rem}",
           f"--config.md.model_workdir={model}", "--config.md.model_experiment="]  # fmt: skip
    res = subprocess.run(cmd, cwd=cg_run.ROOT, env=cg_run.env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json.loads((rem / "evaluation.json").read_text())
    assert ev["model"]["mse"] > 0 and ev["base"]["model"]["mse"] == pytest.approx(base_mse, rel=1e-4)
    steps = [json.loads(line) for line in (rem / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in steps if "train/rem_gap" in r]
    assert len(train_rows) == 3 and all(np.isfinite(r["train/rem_gap"]) for r in train_rows)
    from molgen.cg import export

    tuned, base = export.load_trained(str(rem)), export.load_trained(str(model))
    assert tuned[4]["relent_checkpoint"].startswith(str(rem))
    diff = [float(np.abs(a - b).max()) for a, b in zip(*(jax.tree.leaves(t[2]) for t in (tuned, base)), strict=True)]
    assert max(diff) > 0
    wd = tmp_path / "md"
    md = [*CLI, "--config=experiments/cg_chignolin_md.py:tiny", f"--workdir={wd}", f"--config.md.model_workdir={rem}",
          "--config.md.model_experiment="]  # fmt: skip
    res = subprocess.run(md, cwd=cg_run.ROOT, env=cg_run.env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads((wd / "landscape.json").read_text())
    ref = rep["runs"]["all-atom"]
    assert ref["replicas"] == 2 and [t["ns"] for t in ref["trajectories"]] == [5.0, 5.0]
    assert 0 <= ref["folded_fraction"] < 0.1 and ref["unfolding"] == 1  # the folded start unfolds, never refolds
    assert 0.3 < ref["halves_overlap_rmsd_q"] < 1  # replica 0 against replica 1
    for name in ("CG model (jax-md)", "priors only (jax-md)", "CG model (LAMMPS)"):
        run = rep["runs"][name]
        assert 0 <= run["overlap_rmsd_q"] <= 1 and 0 <= run["halves_overlap_rmsd_q"] <= 1, name
        assert 0 <= run["folded_fraction"] <= 1, name
    # the LAMMPS copies start as the jax-md ones: even copies folded, odd ones unfolded reference frames
    from molgen.cg import analysis, production

    first = production.read_dump(wd / "lammps" / "traj.lammpstrj")[0].reshape(4, 10, 3)
    rmsd = analysis.kabsch_rmsd(first, first[0])
    assert rmsd[2] < 0.5 and rmsd[1] > 3 and rmsd[3] > 3, rmsd
    with np.load(wd / "traj_cg_model_jax_md.npz") as z:  # the copies after burn-in, kept for analysis
        assert len(z.files) == 4 and z["copy_0"].shape[1:] == (10, 3)
    for f in ("fes_1d.png", "fes_2d_rmsd_q.png", "fes_2d_tica.png"):
        assert (wd / f).stat().st_size > 10_000
