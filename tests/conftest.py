"""Test setup: four fake CPU devices (set before jax is first imported), NaN checks on."""

import fcntl
import os
import pathlib
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("MOLGEN_CACHE", str(pathlib.Path.home() / ".cache" / "molgen"))
# One persistent XLA compilation cache for this session, shared with every CLI subprocess (they
# copy os.environ): a resumed or repeated tiny run reuses the programs its first run compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="molgen_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # not the eager ops
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_debug_nans", False)  # enabled per test where NaN-safety is the point


@pytest.fixture(scope="session")
def root():
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (minutes); deselect with -m 'not slow'")


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
    """The folder `name`, filled by `build(folder)` once per test run: the first pytest-xdist
    worker to ask builds it under a file lock, the others wait and reuse it. For expensive
    fixtures the tests only read (each worker would otherwise build its own copy)."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the workers
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def villin_h5(tmp_path_factory):
    """A tiny real mdCATH-format file: villin HP36, 320 and 348 K, one replica, 3 frames each."""
    from molgen.cg import simulate

    def build(d):
        simulate.produce(str(d / "mdcath_dataset_villin.h5"), temperatures=(320, 348), replicas=1, frames=3,
                         steps_per_frame=5, equilibration_steps=10, chunk=2)  # fmt: skip

    return str(built_once(tmp_path_factory, "villin_h5", build) / "mdcath_dataset_villin.h5")


@pytest.fixture(scope="session")
def cg_source(tmp_path_factory):
    """48 real frames: villin at 320 K, two replicas, as experiments/cg_tiny.py simulates them."""
    from molgen.cg import simulate

    def build(d):
        simulate.produce(str(d / "mdcath_dataset_villin.h5"), temperatures=(320,), replicas=2, frames=24,
                         steps_per_frame=5, equilibration_steps=20)  # fmt: skip

    return built_once(tmp_path_factory, "cg_src", build)


@pytest.fixture(scope="session")
def cg_trained(tmp_path_factory, cg_source):
    """A finished tiny CG training run (experiments/cg_tiny.py, 4 stage-1 epochs); read-only."""
    import cg_run

    return built_once(tmp_path_factory, "cg_ref", lambda wd: cg_run.run(wd, cg_source, wd / "tfds", *cg_run.KILL_ARGS))
