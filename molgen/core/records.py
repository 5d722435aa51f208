"""Helpers for TFDS datasets: a build lock, and records read back from ArrayRecord data sources."""

import contextlib
import fcntl
import pathlib


@contextlib.contextmanager
def build_lock(data_dir: str, builder_name: str, config_name: str):
    """Hold an exclusive lock on one dataset config while it is checked and built.

    Two runs on one machine that need the same dataset (two jobs, two pytest workers) would
    otherwise both build it, and the second's final rename fails against the first's output
    ("Destination ... already exists"). The second now waits, then finds the dataset built.
    The lock is a flock on `<data_dir>/<builder>/<config>.lock`; the kernel releases it when the
    holder exits, even when it is killed."""
    path = pathlib.Path(data_dir).expanduser() / builder_name / f"{config_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def as_str(x) -> str:
    """TFDS Text features come back as bytes from an ArrayRecord data source."""
    return x.decode() if isinstance(x, bytes) else str(x)
