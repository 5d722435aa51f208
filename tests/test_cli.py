"""Integration: the real CLI on the tiny config (training, errors, resume, multi-process)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(devices=4):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def kill_when(proc, ready, timeout: float = 600.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 10 ms), or when it has ended or
    `timeout` seconds have passed; the caller checks where the run was killed."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_cli(workdir, data_dir, *overrides, devices=4, check=True, timeout=600):
    cmd = [
        sys.executable,
        "-m",
        "molgen.main",
        "--config=experiments/lm_tiny.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *overrides,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return res


def losses(workdir):
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_tiny_run_writes_everything(tmp_path, data_dir):
    wd = tmp_path / "run"
    run_cli(wd, data_dir)
    for name in [
        "config.json",
        "log.txt",
        "metrics.jsonl",
        "model_config.json",
        "eval/conformers.json",
        "eval/conformer_metrics.png",
        "eval/samples.sdf",
    ]:
        assert (wd / name).exists(), name
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]
    loss = losses(wd)
    assert sorted(loss) == list(range(1, 13)) and loss[12] < loss[1]
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["model"]["preset"] == "test" and cfg["train"]["steps"] == 12
    summary = json.loads((wd / "eval" / "conformers.json").read_text())["summary"]
    assert summary["molecules"] == 2 and summary["generated"] == 4
    assert "step 12/12 loss" in (wd / "log.txt").read_text()


def test_same_seed_same_numbers(tmp_path, data_dir):
    run_cli(tmp_path / "a", data_dir, "--config.eval.num_molecules=0", "--config.train.steps=6")
    run_cli(tmp_path / "b", data_dir, "--config.eval.num_molecules=0", "--config.train.steps=6")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.train.stpes=3", "stpes"),
        ("--config.train.steps=abc", "train.steps"),
        ("--config.nope.x=1", "nope"),
    ],
)
def test_bad_overrides_exit_nonzero_naming_the_key(tmp_path, data_dir, override, needle):
    res = run_cli(tmp_path / "bad", data_dir, override, check=False, timeout=120)
    assert res.returncode != 0
    assert needle in res.stderr


def test_malformed_smiles_in_source_file_is_skipped_and_reported(tmp_path, data_dir):
    src = tmp_path / "mols.csv"
    good = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN(CC)CC", "OCC(O)CO", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"] * 4
    src.write_text("SMILES\n" + "\n".join(good[:10] + ["C1CC(N"] + good[10:]) + "\n")
    wd = tmp_path / "run"
    res = run_cli(
        wd,
        data_dir,
        f"--config.data.source_train={src}",
        "--config.data.n_train=20",
        "--config.data.n_val=4",
        "--config.train.steps=2",
        "--config.eval.num_molecules=0",
    )
    assert f"skipped {src} record 10 ('C1CC(N')" in res.stderr
    report = next(pathlib.Path(data_dir).rglob("build_report.json"), None)
    reports = [json.loads(p.read_text()) for p in pathlib.Path(data_dir).rglob("build_report.json")]
    bad = [f for r in reports for f in r["failures"] if f["smiles"] == "C1CC(N"]
    assert report is not None and bad and bad[0]["record"] == 10


@pytest.mark.slow  # ~90 s; test_lm_post_cli covers SIGKILL + resume of the LM step in the default suite
def test_killed_run_resumes_with_same_losses(tmp_path, data_dir):
    args = [
        "--config.train.steps=40",
        "--config.ckpt.every_steps=10",
        "--config.train.eval_every=1000",
        "--config.eval.num_molecules=0",
        "--config.ckpt.async_save=False",
        "--config.model.n_layers=4",
        "--config.data.seq_len=512",
        "--config.train.batch_size=8",
    ]
    ref = tmp_path / "ref"
    run_cli(ref, data_dir, *args)
    wd = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "molgen.main",
        "--config=experiments/lm_tiny.py",
        f"--workdir={wd}",
        f"--config.data.data_dir={data_dir}",
        *args,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (wd / "checkpoints" / "10").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < 40, f"the run was not killed mid-way: {done}"
    res = run_cli(wd, data_dir, *args)
    assert "resumed from" in res.stderr
    a, b = losses(ref), losses(wd)
    assert set(b) == set(range(1, 41)) or set(b) >= set(range(done[-1] + 1, 41))
    for s in range(done[-1] + 1, 41):
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_continues(tmp_path, data_dir):
    # a constant learning rate: the 8-step and 12-step runs then follow one schedule
    args = ["--config.eval.num_molecules=0", "--config.optim.schedule=constant", "--config.ckpt.every_steps=4"]
    run_cli(tmp_path / "ref", data_dir, *args, "--config.train.steps=12")
    wd = tmp_path / "run"
    run_cli(wd, data_dir, *args, "--config.train.steps=8")
    for f in (wd / "checkpoints" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    res = run_cli(wd, data_dir, *args, "--config.train.steps=12")
    assert "checkpoints/8 does not restore" in res.stderr and "resumed from" in res.stderr
    assert "moved the corrupt checkpoint" in res.stderr
    names = sorted(p.name for p in (wd / "checkpoints").iterdir())
    assert [n for n in names if n.isdigit()] == ["12", "4", "8"], names  # step 8 saved again over the gap
    assert len([n for n in names if n.startswith("8.corrupt-")]) == 1, names
    a, b = losses(tmp_path / "ref"), losses(wd)
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_two_processes_match_one_process(tmp_path, data_dir):
    args = [
        "--config.train.steps=20",
        "--config.eval.num_molecules=0",
        "--config.train.eval_every=10",
        "--config.ckpt.every_steps=10",
        "--config.train.batch_size=8",
    ]
    run_cli(tmp_path / "one", data_dir, *args, devices=4)
    env = _env(devices=2)
    env["MOLGEN_CPU_DEVICES"] = "2"
    env["PYTHON"] = sys.executable
    env.pop("XLA_FLAGS")
    cmd = [
        "bash",
        "launch/local.sh",
        "2",
        "experiments/lm_tiny.py",
        f"--workdir={tmp_path / 'two'}",
        f"--config.data.data_dir={data_dir}",
        *args,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 21))
    for s in range(1, 21):
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_resume_that_cannot_restore_stops_instead_of_starting_over(tmp_path, data_dir):
    wd = tmp_path / "run"
    args = ["--config.train.steps=6", "--config.eval.num_molecules=0"]
    run_cli(wd, data_dir, *args, devices=4)
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    res = run_cli(wd, data_dir, "--config.train.steps=12", "--config.eval.num_molecules=0", devices=2, check=False)
    assert res.returncode != 0
    assert "none restores" in res.stderr
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before
