"""mdCATH-format data: OpenMM producer, reader, CG mapping, bad files, resume after SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from molgen.cg import mdcath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def villin(villin_h5):
    return villin_h5


def test_layout_matches_mdcath(villin):
    with h5py.File(villin, "r") as f:
        assert f.attrs["layout"] == mdcath.LAYOUT
        g = f["villin"]
        n = g.attrs["numProteinAtoms"]
        assert g.attrs["numResidues"] == 36 and g.attrs["numChains"] == 1
        for key in ("chain", "element", "resid", "resname", "z"):
            assert g[key].shape == (n,)
        assert sorted(k for k in g.keys() if k.isdigit()) == ["320", "348"]
        run = g["320"]["0"]
        assert run.attrs["numFrames"] == 3
        assert run["coords"].shape == run["forces"].shape == (3, n, 3)
        assert run["coords"].attrs["unit"] == "Angstrom"
    assert not os.path.exists(villin + ".progress/320_0.npz")


def test_cg_mapping(villin):
    runs = list(mdcath.read_cg(villin))
    assert [(r.temperature, r.replica) for r in runs] == [(320, 0), (348, 0)]
    r = runs[0]
    assert r.positions.shape == r.forces.shape == (3, 36, 3)
    assert [mdcath.AMINO_ACIDS[s] for s in r.species[:3]] == ["MET", "LEU", "SER"]  # HP36: MLSDEDFKAV...
    bonds = np.linalg.norm(np.diff(r.positions, axis=1), axis=-1)
    assert np.all((bonds > 3.5) & (bonds < 4.2)), bonds  # trans CA-CA, about 3.8 Å
    with h5py.File(villin, "r") as f:  # bead force = sum over the residue's atoms (all of them)
        forces = f["villin/320/0/forces"][()]
        top = mdcath.parse_topology(mdcath._text(f["villin/pdbProteinAtoms"]), "villin")
    np.testing.assert_allclose(r.forces[:, 5], forces[:, top.atom_residue == 5].sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.forces.sum(1), forces.sum(1), rtol=1e-4, atol=1e-2)


def _edit(src, dst, fn):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        fn(f)
    return dst


def test_missing_ca_is_rejected_with_its_name(villin, tmp_path):
    def drop_ca(f):  # remove the CA of the fourth residue from the stored PDB text
        text = mdcath._text(f["villin/pdbProteinAtoms"])
        atoms = [ln for ln in text.splitlines() if ln.startswith("ATOM")]
        fourth = sorted({ln[22:26] for ln in atoms}, key=int)[3]
        lines = [
            ln for ln in text.splitlines() if not (ln in atoms and ln[12:16].strip() == "CA" and ln[22:26] == fourth)
        ]
        del f["villin/pdbProteinAtoms"]
        f["villin"].create_dataset("pdbProteinAtoms", data=np.bytes_("\n".join(lines)))
        return fourth.strip()

    resseq = []
    bad = _edit(villin, str(tmp_path / "bad.h5"), lambda f: resseq.append(drop_ca(f)))
    with pytest.raises(
        mdcath.MdcathError,
        match=rf"bad.h5: domain villin, temperature 320 K, replica 0: residue \w+ A{resseq[0]} \(#3\) has no CA",
    ):
        list(mdcath.read_cg(bad))


def test_nan_forces_error_or_skip(villin, tmp_path):
    def poison(f):
        d = f["villin/348/0/forces"]
        x = d[()]
        x[1, 7, 2] = np.nan
        d[...] = x

    bad = _edit(villin, str(tmp_path / "nan.h5"), poison)
    with pytest.raises(
        mdcath.MdcathError, match=r"nan.h5: domain villin, temperature 348 K, replica 0: .*first frame 1"
    ):
        list(mdcath.read_cg(bad))
    runs = list(mdcath.read_cg(bad, on_nan="skip"))
    assert runs[0].skipped_frames == () and runs[1].skipped_frames == (1,)
    assert runs[1].positions.shape[0] == 2


def test_not_hdf5_names_the_file(tmp_path):
    p = tmp_path / "mdcath_dataset_x.h5"
    p.write_text("not hdf5")
    with pytest.raises(mdcath.MdcathError, match="mdcath_dataset_x.h5"):
        list(mdcath.read_cg(str(p)))


@pytest.mark.slow  # ~85 s; keeps the default suite inside its 20-minute budget
def test_producer_resumes_after_sigkill(tmp_path):
    out = str(tmp_path / "mdcath_dataset_villin.h5")
    cmd = [sys.executable, "-m", "molgen.cg.simulate", f"--out={out}", "--temperatures=320", "--replicas=1",
           "--frames=40", "--steps_per_frame=5", "--equilibration_steps=10"]  # fmt: skip
    progress = out + ".progress/320_0.npz"
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 300
    while not os.path.exists(progress) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(progress), "the producer wrote no progress before it was killed"
    n_before = len(np.load(progress)["coords"])
    assert 0 < n_before < 40
    log = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stderr
    assert f"resuming at frame {n_before}" in log
    (run,) = mdcath.read_cg(out)
    assert run.positions.shape == (40, 36, 3) and np.isfinite(run.forces).all()


def test_producer_starts_odd_replicas_from_the_hot_run_and_checks_platforms(tmp_path):
    """Chignolin (5AWL) at 450 K then 340 K with unfolded_from=450: replica 1 at 340 K starts
    from the last 450 K frame (10 steps away), replica 0 from the folded structure."""
    from molgen.cg import simulate

    pdb = os.path.join(ROOT, "third_party", "data", "proteins", "5awl_cln025.pdb")
    out = str(tmp_path / "mdcath_dataset_cln025.h5")
    with pytest.raises(ValueError, match="unfolded_from=450 K must be the first"):
        simulate.produce(out, pdb, "cln025", (340, 450), 2, 2, 1, 0, unfolded_from=450)
    simulate.produce(out, pdb, "cln025", (450, 340), 2, 3, 10, 0, unfolded_from=450, unfolded_frames=4, threads=1)
    runs = {(r.temperature, r.replica): r.coords for r in mdcath.read_runs(out)}
    assert sorted(runs) == [(340, 0), (340, 1), (450, 0)]  # one hot replica per odd replica
    assert len(runs[(450, 0)]) == 4 and len(runs[(340, 0)]) == 3
    hot_end, warm = runs[(450, 0)][-1], runs[(340, 1)][0]
    rms = lambda a, b: float(np.sqrt(((a - b) ** 2).sum(-1).mean()))  # noqa: E731
    # 10 steps after the hot run's end, and further from where the folded replica is
    assert rms(warm, hot_end) < rms(runs[(340, 0)][0], hot_end)
    assert runs[(450, 0)].shape[1] == runs[(340, 0)].shape[1] > 93  # hydrogens added
    with pytest.raises(ValueError, match="platform must be one of"):
        simulate.platform("TPU")
    assert simulate.platform("auto")[0].getName() in ("CUDA", "OpenCL", "CPU")
