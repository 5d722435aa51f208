"""CG frames from a folder of mdCATH-format files: a TFDS builder (ArrayRecord, no TensorFlow).

Every (domain, temperature, replica, frame) becomes one example with `n_max` beads:
positions (Å), forces (kcal/mol/Å; residue sums, or the optimised force map fitted on the
train frames with `force_map="optimized"`, see `molgen.cg.forcemap` and `optimized_runs`),
species (index into `mdcath.AMINO_ACIDS`, the global species map stored in the dataset
metadata and in `species.json`) and a mask. Padded beads
are parked far away on a line, `PARK_SPACING` apart, so they never come within a cutoff of
each other or of the protein and never enter a neighbour list; their forces are zero.

Splits:
- by frame (default): frames of all proteins are shuffled with `seed` and cut into
  train/validation/test by `val_fraction` and `test_fraction`;
- by protein: the domains named in `test_domains` form the test split (transfer), the other
  domains' frames are cut into train/validation.
Frames of the files in `extra_train` (for instance fixed-CA samples at configurations a CG
model visited, `molgen.cg.active`) join the train split only, flagged `extra`: they are valid
force-matching data (at a fixed CG configuration the loss is minimised by the mean force,
whatever the configurations' distribution), but not Boltzmann samples, so the priors are fitted
without them. Validation and test stay those of `source`.
Frames with NaN are rejected (naming the file, domain, temperature and replica) or skipped
and counted in `build_report.json`, as `on_nan` says.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from molgen.cg import forcemap, mdcath
from molgen.core.records import build_once

SPLITS = ("train", "validation", "test")
PARK_ORIGIN = 1.0e4  # Å from the origin
PARK_SPACING = 50.0  # Å between parked beads: more than any cutoff
log = logging.getLogger("molgen")


@dataclasses.dataclass
class CGConfig(tfds.core.BuilderConfig):
    source: str = ""  # folder of mdcath_dataset_*.h5 files (or one file)
    n_max: int = 0  # 0: the largest protein
    split: str = "frame"  # "frame" or "protein"
    test_domains: tuple = ()
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    on_nan: str = "error"
    seed: int = 0
    force_map: str = "sum"  # "sum" (residue sums), "optimized" (forcemap.fit on the train frames) or
    # "stored" (the bead forces of CA-mapped files, molgen.cg.mapped)
    force_map_window: int = 1  # residues either side whose atoms an optimised bead force may use
    extra_train: tuple = ()  # folders/files of mdCATH-format frames that join the train split only
    temperatures: tuple = ()  # K: only runs at these temperatures (empty: all)


def source_files(source: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(source, "*.h5"))) if os.path.isdir(source) else [source]
    if not files or not all(os.path.exists(f) for f in files):
        raise FileNotFoundError(f"no mdCATH .h5 files at {source!r}")
    return files


def config_name(c: CGConfig) -> str:
    stamp = "".join(_stamp(f) for f in source_files(c.source))
    key = [stamp, c.n_max, c.split, list(c.test_domains), c.val_fraction, c.test_fraction, c.on_nan, c.seed]
    if c.force_map != "sum":
        key += [c.force_map, c.force_map_window]
    if c.temperatures:
        key += [[int(t) for t in c.temperatures]]
    if c.extra_train:
        key += [_stamp(f) for src in c.extra_train for f in source_files(src)]
    key = json.dumps(key)
    return "cg_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _stamp(f):
    return f"{os.path.basename(f)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}"


def parked(n: int) -> np.ndarray:
    """Positions of n padded beads."""
    x = PARK_ORIGIN + PARK_SPACING * np.arange(n, dtype=np.float32)
    return np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)


def pad_frame(species, positions, forces, n_max: int):
    n = len(species)
    if n > n_max:
        raise ValueError(f"protein with {n} beads exceeds n_max={n_max}")
    pos = np.concatenate([positions, parked(n_max - n)]).astype(np.float32)
    frc = np.concatenate([forces, np.zeros((n_max - n, 3), np.float32)]).astype(np.float32)
    spc = np.concatenate([species, np.zeros(n_max - n, np.int32)]).astype(np.int32)
    mask = np.arange(n_max) < n
    return {"positions": pos, "forces": frc, "species": spc, "mask": mask}


class MdcathCG(tfds.core.GeneratorBasedBuilder):
    """One-bead-per-residue frames of mdCATH-format trajectories."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "`extra` flag: frames from data.extra_train"}
    BUILDER_CONFIGS = [CGConfig(name="default")]

    def __init__(self, *, config: CGConfig, **kw):
        super().__init__(config=config, **kw)
        self.counts: dict = {}
        self.force_maps: dict = {}
        self.n_source = 0  # runs before this index come from `source`, the rest from `extra_train`

    def _info(self):
        n = self.builder_config.n_max
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "positions": tfds.features.Tensor(shape=(n, 3), dtype=np.float32),
                    "forces": tfds.features.Tensor(shape=(n, 3), dtype=np.float32),
                    "species": tfds.features.Tensor(shape=(n,), dtype=np.int32),
                    "mask": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
                    "domain": tfds.features.Text(),
                    "temperature": np.int32,
                    "replica": np.int32,
                    "frame": np.int32,
                    "extra": np.bool_,
                }
            ),
            metadata=tfds.core.MetadataDict(species=list(mdcath.AMINO_ACIDS)),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        runs = [r for f in source_files(c.source) for r in mdcath.read_cg(f, on_nan=c.on_nan, temperatures=_temps(c))]
        if not runs:
            raise ValueError(f"data.source {c.source}: no runs at data.temperatures {list(c.temperatures)}")
        index = [(i, f) for i, r in enumerate(runs) for f in range(len(r.positions))]
        rng = np.random.default_rng(c.seed)
        if c.split == "frame":
            order = rng.permutation(len(index))
            n_test, n_val = int(round(c.test_fraction * len(index))), int(round(c.val_fraction * len(index)))
            parts = {
                "test": order[:n_test],
                "validation": order[n_test : n_test + n_val],
                "train": order[n_test + n_val :],
            }
        elif c.split == "protein":
            known = {r.domain for r in runs}
            if not set(c.test_domains) <= known:
                raise ValueError(
                    f"test_domains {sorted(set(c.test_domains) - known)} not among the domains {sorted(known)}"
                )
            test = np.asarray([k for k, (i, _) in enumerate(index) if runs[i].domain in c.test_domains], np.int64)
            rest = rng.permutation([k for k, (i, _) in enumerate(index) if runs[i].domain not in c.test_domains])
            n_val = int(round(c.val_fraction * len(rest)))
            parts = {"test": test, "validation": rest[:n_val], "train": rest[n_val:]}
        else:
            raise ValueError(f"data.split must be 'frame' or 'protein', got {c.split!r}")
        if c.force_map == "optimized":
            runs, self.force_maps, fm_report = optimized_runs(c, runs, index, parts)
        elif c.force_map == "stored":
            self.force_maps = {d: w for f in source_files(c.source) for d, w in mdcath.stored_force_maps(f).items()}
            fm_report = {"kind": "stored", "files": {os.path.basename(f): json.loads(mdcath.provenance(f))
                                                     for f in source_files(c.source)}}  # fmt: skip
        n_source = len(runs)
        if c.extra_train:  # appended to train; the source's validation and test are unchanged
            maps = self.force_maps or None
            extra = [r for src in c.extra_train for f in source_files(src)
                     for r in mdcath.read_cg(f, on_nan=c.on_nan, force_maps=maps)]  # fmt: skip
            unknown = sorted({r.domain for r in extra} - {r.domain for r in runs[:n_source]})
            if unknown and c.force_map != "sum":
                raise ValueError(f"data.extra_train: domains {unknown} are not in data.source, so they have no "
                                 "fitted force map")  # fmt: skip
            new = [(n_source + i, f) for i, r in enumerate(extra) for f in range(len(r.positions))]
            parts["train"] = np.concatenate([parts["train"], len(index) + np.arange(len(new))]).astype(np.int64)
            runs, index = runs + extra, index + new
        self.n_source = n_source
        self.counts = {
            "force_map": fm_report if c.force_map != "sum" else "sum",
            "domains": sorted({r.domain for r in runs}),
            "frames": {s: int(len(v)) for s, v in parts.items()},
            "extra_train_frames": int(sum(len(r.positions) for r in runs[n_source:])),
            "skipped_frames": {
                f"{r.domain}/{r.temperature}/{r.replica}": list(r.skipped_frames) for r in runs if r.skipped_frames
            },
        }
        return {s: self._generate_examples(runs, [index[k] for k in sorted(parts[s])]) for s in SPLITS}

    def _generate_examples(self, runs, items):
        n_max = self.builder_config.n_max
        for i, f in items:
            r = runs[i]
            ex = pad_frame(r.species, r.positions[f], r.forces[f], n_max)
            extra = i >= self.n_source
            ex.update(domain=r.domain, temperature=r.temperature, replica=r.replica, frame=f, extra=extra)
            yield f"{f'extra{i}_' if extra else ''}{r.domain}_{r.temperature}_{r.replica}_{f}", ex


def optimized_runs(c: CGConfig, runs, index, parts):
    """Fit an optimised force map per domain (`forcemap.fit`) on the domain's train frames (or,
    for a test-only domain of a protein split, on all its frames: the map is a choice of label,
    made without the model) and map every frame with it. Returns the remapped runs, the maps
    and a report: per domain the mean squared bead force of the residue sum and of the
    optimised map on the fitting frames and on the validation frames (held out from the fit)."""

    def frames(split):
        return {(runs[i].domain, runs[i].temperature, runs[i].replica, f) for i, f in (index[k] for k in parts[split])}

    train, val = frames("train"), frames("validation")
    fit_on = {d for d, *_ in train}
    per_domain = {}  # domain -> [topology, groups, fitting forces, validation forces]
    for f in source_files(c.source):
        for run in mdcath.read_runs(f, on_nan=c.on_nan, temperatures=_temps(c)):
            d = run.domain
            if d not in per_domain:
                groups = forcemap.constraint_groups(mdcath.atom_elements(run.pdb_text), run.coords[0], run.label + ": ")
                per_domain[d] = [run.topology, groups, [], []]
            keys = [(d, run.temperature, run.replica, i) for i in range(len(run.forces))]
            use = [k in train or d not in fit_on for k in keys]
            per_domain[d][2].append(run.forces[np.asarray(use, bool)])
            per_domain[d][3].append(run.forces[np.asarray([k in val for k in keys], bool)])
    maps, report = {}, {"kind": "optimized", "window": c.force_map_window, "domains": {}}
    for d, (top, groups, fit_f, val_f) in per_domain.items():
        fit_f, val_f = np.concatenate(fit_f), np.concatenate(val_f)
        w = forcemap.fit(top, groups, fit_f, window=c.force_map_window)
        forcemap.check(w, top, groups, f"domain {d}: ")
        maps[d] = w
        s = forcemap.residue_sum(top)
        r = {"fit_frames": len(fit_f), "fit_on": "train" if d in fit_on else "all frames (no train frames)",
             "mean_square_sum_fit": forcemap.mean_square(s, fit_f),
             "mean_square_optimized_fit": forcemap.mean_square(w, fit_f)}  # fmt: skip
        if len(val_f):
            r.update(validation_frames=len(val_f), mean_square_sum_validation=forcemap.mean_square(s, val_f),
                     mean_square_optimized_validation=forcemap.mean_square(w, val_f))  # fmt: skip
        report["domains"][d] = r
        log.info("force map %s: mean squared bead force %s", d, {k: v for k, v in r.items() if "mean_square" in k})
    remapped = [t for f in source_files(c.source) for t in mdcath.read_cg(f, on_nan=c.on_nan, temperatures=_temps(c),
                                                                           force_maps=maps)]  # fmt: skip
    return remapped, maps, report


def _temps(c: CGConfig):
    return tuple(int(t) for t in c.temperatures) or None


def force_maps(builder) -> dict:
    """{domain: W [R, N]} of an optimised-map dataset, {} for residue sums."""
    path = pathlib.Path(builder.data_dir) / "force_maps.npz"
    if builder.builder_config.force_map == "sum":
        return {}
    if not path.exists():  # a build killed between TFDS's commit and this file: rebuild it
        raise FileNotFoundError(f"{path}: missing for an optimised-force-map dataset; delete {builder.data_dir} "
                                "and run again to rebuild it")  # fmt: skip
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def build(cfg, data_dir: str) -> MdcathCG:
    """Build (once) and return the builder for a `data` config group; writes build_report.json
    and species.json next to the dataset."""
    if cfg.force_map not in ("sum", "optimized", "stored"):
        raise ValueError(f"data.force_map must be 'sum', 'optimized' or 'stored', got {cfg.force_map!r}")
    for f in source_files(os.path.expanduser(cfg.source)):
        if mdcath.is_mapped(f) != (cfg.force_map == "stored"):
            kind = "a CA-mapped file (molgen.cg.mapped)" if mdcath.is_mapped(f) else "an all-atom mdCATH file"
            want = "stored" if mdcath.is_mapped(f) else "sum or optimized"
            raise mdcath.MdcathError(f"{f}: {kind}; data.force_map={cfg.force_map!r} needs {want}")
    n_max = cfg.n_max or max(len(r.species) for f in source_files(cfg.source) for r in _topologies(f))
    bc = CGConfig(
        name="",
        source=os.path.abspath(os.path.expanduser(cfg.source)),
        n_max=n_max,
        split=cfg.split,
        test_domains=tuple(cfg.test_domains),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        on_nan=cfg.on_nan,
        seed=cfg.seed,
        force_map=cfg.force_map,
        force_map_window=cfg.force_map_window,
        extra_train=extra_sources(cfg.extra_train),
        temperatures=tuple(int(t) for t in cfg.temperatures),
    )
    bc = dataclasses.replace(bc, name=config_name(bc))

    def finish(builder, out):
        (out / "species.json").write_text(json.dumps(list(mdcath.AMINO_ACIDS)))
        if builder.force_maps:
            np.savez(out / "force_maps.npz", **builder.force_maps)
        report = {"config": dataclasses.asdict(bc), **builder.counts}
        (out / "build_report.json").write_text(json.dumps(report, indent=1, default=str))
        n_skipped = sum(len(v) for v in builder.counts["skipped_frames"].values())
        if n_skipped:
            log.warning("skipped %d frames with NaN; see %s", n_skipped, out / "build_report.json")

    return build_once(MdcathCG, bc, data_dir, finish)


def extra_sources(value) -> tuple:
    """`data.extra_train`: comma-separated folders or files (or a sequence of them) -> absolute paths."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(os.path.abspath(os.path.expanduser(v.strip())) for v in items if v.strip())
    for v in out:
        try:
            source_files(v)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.extra_train: {e}") from None
    return out


def report(builder) -> dict:
    return json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())


def _topologies(path):
    """The topology of each domain of a file (to size n_max) without reading frames."""
    import h5py

    with h5py.File(path, "r") as f:
        for dom in f.keys():
            yield mdcath.parse_topology(
                mdcath._text(f[dom]["pdbProteinAtoms"]), dom, f"{os.path.basename(path)}: domain {dom}: "
            )
