"""Crystal RL (GRPO over the DDIM chain) through the real CLI on a tiny VAE -> LDM chain: a run
killed mid-way resumes to the same parameters, rollouts and evaluation as an uninterrupted one."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_cli import kill_when
from test_crystal import ROOT, _cli, tiny_csvs, tiny_vae  # noqa: F401  (fixtures)

from molgen.core import checkpoint
from tests.conftest import built_once


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x]


@pytest.fixture(scope="module")
def ldm(tiny_vae, tmp_path_factory):  # noqa: F811
    """The tiny LDM (`ldm` in the folder) on the shared tiny VAE."""

    def build(t):
        vae, dd = tiny_vae / "vae", tiny_vae / "tfds"
        _cli("experiments/crystal_ldm_mp20.py:tiny", t / "ldm", f"--config.vae_workdir={vae}",
             f"--config.data_dir={dd}", "--config.predictor_workdir=", "--config.vae_config=")  # fmt: skip

    return built_once(tmp_path_factory, "crystal_rl", build)


COMPARE = ("loss", "kl", "ratio", "grad_norm", "reward", "r_creativity", "r_structure_diversity")


def test_rl_killed_resumes_to_the_same_parameters_and_rollouts(ldm, tiny_vae, tmp_path):  # noqa: F811
    from molgen.crystal.train_ldm import load_ldm

    args = [f"--config.ldm_workdir={ldm / 'ldm'}", "--config.ldm_config=", f"--config.data_dir={tiny_vae / 'tfds'}",
            "--config.ckpt.async_save=False"]  # fmt: skip
    ref = tmp_path / "ref"
    _cli("experiments/crystal_rl_mp20.py:tiny", ref, *args)
    wd = tmp_path / "killed"
    cfg = "--config=experiments/crystal_rl_mp20.py:tiny"
    cmd = [sys.executable, "-m", "molgen.main", cfg, f"--workdir={wd}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace = wd / "rollouts.jsonl"
    # step 3 traced, checkpoint 4 not yet written
    kill_when(proc, lambda: trace.exists() and trace.read_text().count("\n") >= 3)
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done == [2], f"not killed between steps 3 and 4: checkpoints {done}"
    res = _cli("experiments/crystal_rl_mp20.py:tiny", wd, *args)
    assert "resumed crystal RL at step 2" in res.stderr
    a, b = lines(ref / "rollouts.jsonl"), lines(trace)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # the traced step after the checkpoint was redone once
    assert a == b  # the same samples (formulas) and reward parts
    assert set(a[0]) >= {"formula", "reward", "creativity", "structure_diversity", "composition_diversity"}
    ta = [r for r in lines(ref / "metrics.jsonl") if "train/reward" in r]
    tb = [r for r in lines(wd / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in tb] == [1, 2, 3, 4]
    for x, y in zip(ta, tb, strict=True):
        for k in COMPARE:
            assert y["train/" + k] == pytest.approx(x["train/" + k], rel=1e-4, abs=1e-9), (x["step"], k)
    sampler, _ = load_ldm(str(ldm / "ldm"))
    pa = checkpoint.restore_params(str(ref / "checkpoints"), sampler.params)
    pb = checkpoint.restore_params(str(wd / "checkpoints"), sampler.params)
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), pa, sampler.params)
    assert max(jax.tree.leaves(moved)) > 0  # RL changed the DiT
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7), pa, pb)
    s = json.loads((wd / "summary.json").read_text())
    for when in ("before", "after"):
        assert set(s[when]) == {"eta1", "eta0"}
        assert {"valid", "valid_se", "unique", "novel", "reward", "distinct_formulas", "r_creativity_se"} <= set(
            s[when]["eta1"]
        )


def test_csp_cli_tiny(tiny_vae, tmp_path):  # noqa: F811
    """The composition-conditioned LDM trains and predicts structures for test compositions:
    csp.json with k=1 and best-of-k rates, and the k=1 CIFs with exactly the test compositions."""
    from molgen.crystal import common

    wd = tmp_path / "csp"
    _cli("experiments/crystal_csp_mp20.py:tiny", wd, f"--config.vae_workdir={tiny_vae / 'vae'}",
         f"--config.data_dir={tiny_vae / 'tfds'}", "--config.vae_config=")  # fmt: skip
    res = json.loads((wd / "csp.json").read_text())
    assert res["n"] == 4 and res["k"] == 2 and set(res) >= {"k1", "k2", "sample_seconds"}
    for k in ("k1", "k2"):
        assert 0.0 <= res[k]["match_rate"] <= 1.0 and res[k]["matched"] == round(res[k]["match_rate"] * 4)
    assert res["k2"]["matched"] >= res["k1"]["matched"]
    from molgen.chem import crystal as xtal
    from molgen.crystal.common import crystals_of, load_splits

    _, _, vinfo = common.load_vae(str(tiny_vae / "vae"))
    cfg = json.loads((wd / "config.json").read_text())
    import ml_collections

    _, _, splits, _ = load_splits(ml_collections.ConfigDict(cfg), vinfo)
    want = [sorted(c.species.tolist()) for c in crystals_of(splits["test"])[:4]]
    cifs = sorted((wd / "samples" / "csp_k1").glob("*.cif"))
    assert cifs  # some decoded lattices admit a cell even for the 4-step tiny model
    for cif in cifs:
        i = int(cif.stem.split("_")[-1])
        assert sorted(xtal.parse_cif(cif.read_text(), str(cif)).species.tolist()) == want[i]
