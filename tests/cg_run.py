"""Running the CG CLI from tests (shared by the CG test modules and their fixtures)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
KILL_ARGS = ["--config.stages.stage1.epochs=4"]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = str(ROOT)
    return e


def cmd(workdir, source, data_dir, *extra, config="experiments/cg_tiny.py"):
    return [sys.executable, "-m", "molgen.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.data.source={source}", f"--config.data.data_dir={data_dir}", *extra]  # fmt: skip


def run(workdir, source, data_dir, *extra):
    res = subprocess.run(cmd(workdir, source, data_dir, *extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    if res.returncode:
        raise AssertionError(res.stderr[-4000:])
    return res


def data_config(source, **overrides):
    """experiments/cg_tiny.py's data group (every key the builder reads) on `source`."""
    import experiments.cg_tiny as tiny

    cfg = tiny.get_config().data
    cfg.source = str(source)
    cfg.update(overrides)
    return cfg
