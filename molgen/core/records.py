"""Helpers for TFDS datasets: a build lock, and records read back from ArrayRecord data sources."""

import contextlib
import fcntl
import pathlib

import tensorflow_datasets as tfds


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


def build_once(builder_cls, config, data_dir: str, finish):
    """The TFDS builder for `config` under `data_dir`, built (ArrayRecord) unless its
    `build_report.json` exists. After a build, `finish(builder, out_dir)` writes that report and
    whatever else the family keeps beside the data. All of it runs under `build_lock`."""
    data_dir = str(pathlib.Path(data_dir).expanduser())
    with build_lock(data_dir, builder_cls.name, config.name):
        builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
        out = pathlib.Path(builder.data_dir)
        if not (out / "build_report.json").exists():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            finish(builder, out)
    return builder


def as_str(x) -> str:
    """TFDS Text features come back as bytes from an ArrayRecord data source."""
    return x.decode() if isinstance(x, bytes) else str(x)
