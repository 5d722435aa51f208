"""The atomica CLI on the tiny config: a pretraining run end to end, and a killed run that
resumes and continues the same loss curve."""

import json
import subprocess
import sys

import pytest
from test_cli import _env, kill_when

from tests.conftest import ROOT, built_once

CFG = "--config=experiments/atomica_pretrain.py:tiny"


def _cli(workdir, data_dir, *extra):
    cmd = [sys.executable, "-m", "molgen.main", CFG, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.ckpt.async_save=False", *extra]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return res


def _train(path):
    rows = [json.loads(s) for s in path.read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny pretraining run `ref` and its TFDS folder `tfds`, built once for all workers."""
    return built_once(tmp_path_factory, "atomica", lambda d: _cli(d / "ref", d / "tfds"))


@pytest.fixture(scope="module")
def data_dir(shared):
    return shared / "tfds"


@pytest.fixture(scope="module")
def reference(shared):
    return shared / "ref"


def test_pretrain_tiny_writes_losses_beside_baselines(reference):
    ev = json.loads((reference / "evaluation.json").read_text())
    for split in ("test", "validation"):
        r = ev[split]
        assert r["n"] == 4
        for k in ("trans", "rot", "tor"):
            assert r[f"{k}_base"] > 0 and r[f"{k}_ratio"] == pytest.approx(r[k] / r[f"{k}_base"])
        assert 0 <= r["mask_base_acc"] <= 1 and r["mask_base_ce"] > 0
    assert sum(ev["data"]["test"].values()) > 0 and ev["test_by_modality"]
    assert {"train/trans_base", "train/mask_acc", "train/tor"} <= set(_train(reference / "metrics.jsonl")[4])
    assert (reference / "config.json").exists() and (reference / "tensorboard").exists()


@pytest.mark.slow  # ~75 s; the core loop's resume is covered by test_cli and the other families' killed runs
def test_killed_pretraining_resumes_the_same_loss_curve(reference, data_dir, tmp_path):
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "molgen.main", CFG, f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
           "--config.ckpt.async_save=False"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = wd / "log.txt"
    kill_when(proc, lambda: log.exists() and "step 3/4" in log.read_text())
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done == [2], f"not killed between steps 3 and 4: checkpoints {done}"
    res = _cli(wd, data_dir)
    assert "resumed from" in res.stderr
    a, b = _train(reference / "metrics.jsonl"), _train(wd / "metrics.jsonl")
    for step in (3, 4):
        for k in ("train/loss", "train/trans", "train/tor", "train/mask"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-4), (step, k)


@pytest.fixture(scope="module")
def small_sources(tmp_path_factory):
    """Three PDB entries (ligand, ion, nucleic acid) and two Docking Benchmark pairs."""
    import shutil

    src = tmp_path_factory.mktemp("sites")
    plip, bm5 = ROOT / "third_party/data/complexes/plip_pdb", ROOT / "third_party/data/complexes/bm5_bound"
    for name in ("1xdn.pdb.gz", "1vfy.pdb.gz", "1tf6.pdb.gz", "3o1h.pdb.gz"):
        shutil.copy(plip / name, src / name)
    for pdb in ("1A2K", "1AY7"):
        for side in ("r", "l"):
            shutil.copy(bm5 / f"{pdb}_{side}_b-matched.pdb.gz", src / f"{pdb}_{side}_b-matched.pdb.gz")
    return src


@pytest.mark.parametrize(
    "mode",
    ["frozen", pytest.param("finetune", marks=pytest.mark.slow)],  # finetune: ~65 s, outside the default budget
)
def test_binding_site_tiny_cli(mode, reference, data_dir, small_sources, tmp_path):
    """tiny: the quick variant's linear probe (frozen), or the full variant's fine-tuning."""
    wd = tmp_path / f"site_{mode}"
    cmd = [sys.executable, "-m", "molgen.main", "--config=experiments/atomica_binding_site.py:tiny",
           f"--workdir={wd}", f"--config.data.data_dir={data_dir}", f"--config.pretrain_workdir={reference}",
           f"--config.data.sources=('{small_sources}',)", "--config.ckpt.async_save=False",
           f"--config.site.mode={mode}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json.loads((wd / "evaluation.json").read_text())
    assert ev["mode"] == mode
    ev = ev["test"]
    for nm in ("pretrained", "random", "logistic"):
        assert 0 <= ev[nm]["auroc"] <= 1 and len(ev[nm]["auroc_ci"]) == 2
    assert "pretrained_minus_random" in ev and "pretrained_minus_logistic" in ev
    assert ev["residues"] > 100 and 0 < ev["positives"] < ev["residues"]
    assert ev["pretrained"]["auroc"] != ev["random"]["auroc"]  # two different encoders
    joint = ("pretrained+type_rsa_minus_logistic" in ev) and ("random+type_rsa" in ev)
    assert joint == (mode == "frozen")  # the probe with type and RSA added: frozen features only
    finetuned = (wd / "pretrained" / "checkpoints").is_dir() and (wd / "random" / "metrics.jsonl").exists()
    assert finetuned == (mode == "finetune")


def test_embedding_cli(reference, tmp_path):
    out = tmp_path / "emb" / "interfaces"
    cmd = [sys.executable, "-m", "molgen.atomica.embed", f"--workdir={reference}", f"--out={out}",
           "--splits=validation,test"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    import numpy as np

    d = np.load(str(out) + ".npz")
    np.testing.assert_allclose(np.linalg.norm(d["embeddings"], axis=1), 1.0, atol=1e-5)
    rows = (tmp_path / "emb" / "interfaces.csv").read_text().splitlines()
    assert rows[0] == "index,split,entry,structure,segments,modality" and len(rows) == len(d["embeddings"]) + 1
    assert set(d["split"]) <= {"validation", "test"} and len(d["split"])  # --splits: only those
