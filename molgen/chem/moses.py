"""MOSES SMILES, read from the `molsets` wheel (REFERENCE.md section 4).

Decision: `molsets` 0.3.1 pins `pomegranate==0.12.0`, which does not build on Python
3.11, so it is never pip-installed with its dependencies. If the `moses` package is
importable its data folder is used; otherwise the wheel is fetched once with
`pip download molsets==0.3.1 --no-deps` into the cache and read as a zip file.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pathlib
import subprocess
import sys
import zipfile

WHEEL = "molsets-0.3.1-py3-none-any.whl"
SPLITS = ("train", "test", "test_scaffolds")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOLGEN_CACHE", pathlib.Path.home() / ".cache" / "molgen"))


def _wheel() -> pathlib.Path:
    path = cache_dir() / "wheels" / WHEEL
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "molsets==0.3.1", "--no-deps", "-q", "-d", str(path.parent)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not fetch {WHEEL} ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    return path


def read_smiles(split: str, path: str | None = None) -> list[str]:
    """All SMILES of a MOSES split, in file order; `path` overrides with a local CSV(.gz) file."""
    if path:
        raw = pathlib.Path(path).read_bytes()
        name = str(path)
    else:
        if split not in SPLITS:
            raise ValueError(f"unknown MOSES split {split!r}; expected one of {SPLITS}")
        member = f"moses/dataset/data/{split}.csv.gz"
        spec = importlib.util.find_spec("moses")
        local = (
            pathlib.Path(spec.origin).parent / "dataset" / "data" / f"{split}.csv.gz" if spec and spec.origin else None
        )
        if local is not None and local.exists():
            raw, name = local.read_bytes(), str(local)
        else:
            wheel = _wheel()
            with zipfile.ZipFile(wheel) as zf:
                raw, name = zf.read(member), f"{wheel}!{member}"
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = io.StringIO(raw.decode()).read().splitlines()
    if not lines or lines[0].split(",")[0].strip().upper() != "SMILES":
        raise ValueError(f"{name}: expected a CSV with a 'SMILES' header, got {lines[:1]}")
    return [ln.split(",")[0].strip() for ln in lines[1:] if ln.strip()]
