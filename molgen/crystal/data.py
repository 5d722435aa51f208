"""Crystals from a folder of CDVAE-format CSV splits: a TFDS builder (ArrayRecord, no TensorFlow).

The folder holds `train.csv`, `val.csv` and `test.csv` (the CDVAE layout, e.g. full MP-20; each
may be gzip-compressed as `.csv.gz`),
or any subset of them with `resplit` set: then all rows are pooled and cut into
train/validation/test with `seed` (perov_5 here ships only val and test). Each row's `cif`
is parsed with pymatgen and Niggli-reduced; an example holds the lattice matrix and
parameters, fractional coordinates, atomic numbers and a mask, padded to `n_max` atoms
(0: the largest crystal in the folder), plus the property columns named in the config (NaN
where a row has no value). A row whose CIF does not parse is skipped, counted and named
(file, row, material_id, error) in `build_report.json`; the build goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from molgen.chem import crystal as xtal
from molgen.core.records import build_once

SPLITS = ("train", "validation", "test")
FILES = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
log = logging.getLogger("molgen")


@dataclasses.dataclass
class CrystalConfig(tfds.core.BuilderConfig):
    source: str = ""
    n_max: int = 0
    properties: tuple = ()
    resplit: tuple = ()  # (val_fraction, test_fraction): pool every CSV and split with seed
    seed: int = 0


def csv_files(source: str) -> dict[str, str]:
    """split -> path of `<name>.csv` or, failing that, `<name>.csv.gz` in `source`."""
    found = {}
    for split, name in FILES.items():
        for path in (os.path.join(source, name), os.path.join(source, name + ".gz")):
            if os.path.exists(path):
                found[split] = path
                break
    if not found:
        raise FileNotFoundError(f"no {'/'.join(FILES.values())} (or .csv.gz) in {source!r}")
    return found


def config_name(c: CrystalConfig) -> str:
    stamp = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in csv_files(c.source).values()]
    key = json.dumps([stamp, c.n_max, list(c.properties), list(c.resplit), c.seed])
    return "crystal_" + hashlib.sha1(key.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def parse_rows(path: str, properties: tuple) -> tuple[list[dict], list[dict]]:
    """(parsed records, skipped rows) of one CSV file (cached: sizing n_max and building share it)."""
    rows, skipped = xtal.read_csv(path), []
    if rows and "cif" not in rows[0]:
        raise ValueError(f"{path}: no 'cif' column (columns: {sorted(rows[0])})")
    missing = [p for p in properties if rows and p not in rows[0]]
    if missing:
        raise ValueError(f"{path}: property columns {missing} not in the file (columns: {sorted(rows[0])})")
    out = []
    for i, r in enumerate(rows):
        mid = r.get("material_id", "")
        where = f"{path}: row {i} (material_id {mid})"
        try:
            c = xtal.parse_cif(r["cif"], where)
        except xtal.CrystalError as e:
            skipped.append({"file": path, "row": i, "material_id": mid, "error": str(e)})
            continue
        props = {p: _float(r.get(p)) for p in properties}
        out.append({"crystal": c, "material_id": str(mid), "properties": props})
    return out, skipped


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def pad(c: xtal.Crystal, n_max: int) -> dict:
    n = len(c.species)
    if n > n_max:
        raise ValueError(f"crystal with {n} atoms exceeds n_max={n_max}")
    frac = np.zeros((n_max, 3), np.float32)
    frac[:n] = c.frac
    frac[frac >= 1.0] -= 1.0  # values just below 1 round up to 1 in float32
    species = np.zeros(n_max, np.int32)
    species[:n] = c.species
    return {
        "lattice": c.lattice.astype(np.float32),
        "params": c.params.astype(np.float32),
        "frac": frac,
        "species": species,
        "mask": np.arange(n_max) < n,
        "num_atoms": np.int32(n),
    }


def unpad(ex: dict) -> xtal.Crystal:
    m = np.asarray(ex["mask"], bool)
    return xtal.Crystal(
        np.asarray(ex["lattice"], np.float64), np.asarray(ex["frac"], np.float64)[m], np.asarray(ex["species"])[m]
    )


class CrystalCSV(tfds.core.GeneratorBasedBuilder):
    """Niggli-reduced crystals of a CDVAE-format CSV folder."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [CrystalConfig(name="default")]

    def __init__(self, *, config: CrystalConfig, **kw):
        super().__init__(config=config, **kw)
        self.counts: dict = {}

    def _info(self):
        c = self.builder_config
        n = c.n_max
        feats = {
            "lattice": tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
            "params": tfds.features.Tensor(shape=(6,), dtype=np.float32),
            "frac": tfds.features.Tensor(shape=(n, 3), dtype=np.float32),
            "species": tfds.features.Tensor(shape=(n,), dtype=np.int32),
            "mask": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
            "num_atoms": np.int32,
            "material_id": tfds.features.Text(),
            "properties": tfds.features.Tensor(shape=(len(c.properties),), dtype=np.float32),
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        parsed, skipped, rows = {}, [], {}
        for split, path in csv_files(c.source).items():
            parsed[split], bad = parse_rows(path, tuple(c.properties))
            rows[split] = len(parsed[split]) + len(bad)
            skipped += bad
        if c.resplit:
            pool = [r for s in SPLITS for r in parsed.get(s, [])]
            order = np.random.default_rng(c.seed).permutation(len(pool))
            n_val, n_test = (int(round(f * len(pool))) for f in c.resplit)
            parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val],
                     "train": order[n_test + n_val :]}  # fmt: skip
            parsed = {s: [pool[i] for i in sorted(parts[s])] for s in SPLITS}
        elif set(parsed) != set(SPLITS):
            raise ValueError(f"{c.source}: has {sorted(FILES[s] for s in parsed)}; set data.resplit to split it")
        self.counts = {
            "rows": rows,
            "examples": {s: len(parsed[s]) for s in SPLITS},
            "skipped": skipped,
            "n_max": c.n_max,
        }
        return {s: self._generate_examples(parsed[s], s) for s in SPLITS}

    def _generate_examples(self, records, split):
        for i, r in enumerate(records):
            ex = pad(r["crystal"], self.builder_config.n_max)
            ex["material_id"] = r["material_id"]
            ex["properties"] = np.asarray([r["properties"][p] for p in self.builder_config.properties], np.float32)
            yield f"{split}_{i}", ex


def build(cfg, data_dir: str) -> CrystalCSV:
    """Build (once) and return the builder for a `data` config group; writes build_report.json."""
    source = os.path.abspath(os.path.expanduser(cfg.source))
    n_max = cfg.n_max or max_atoms(source, tuple(cfg.properties))
    bc = CrystalConfig(name="", source=source, n_max=n_max, properties=tuple(cfg.properties),
                       resplit=tuple(cfg.resplit), seed=cfg.seed)  # fmt: skip
    bc = dataclasses.replace(bc, name=config_name(bc))

    def finish(builder, out):
        report = {"config": dataclasses.asdict(bc), **builder.counts}
        (out / "build_report.json").write_text(json.dumps(report, indent=1, default=str))
        if builder.counts["skipped"]:
            log.warning("skipped %d rows whose CIF does not parse; see %s", len(builder.counts["skipped"]),
                        out / "build_report.json")  # fmt: skip

    return build_once(CrystalCSV, bc, data_dir, finish)


def max_atoms(source: str, properties: tuple) -> int:
    """The largest atom count of any row (from the CIF's site count, before the full build)."""
    best = max(
        (len(r["crystal"].species) for p in csv_files(source).values() for r in parse_rows(p, properties)[0]), default=0
    )
    if not best:
        raise ValueError(f"{source}: no row's CIF parses")
    return best


def report(builder) -> dict:
    return json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())


def load_split(source) -> dict:
    """A whole split as numpy arrays (crystal datasets here are small)."""
    keys = ("lattice", "params", "frac", "species", "mask", "num_atoms", "properties")
    rows = [source[i] for i in range(len(source))]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}
