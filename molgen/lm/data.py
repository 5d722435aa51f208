"""MOSES 3D units: a TFDS builder (ArrayRecord, no TensorFlow) and the packed Grain pipeline.

Build: MOSES SMILES -> RDKit ETKDG + MMFF conformers (worker processes, deterministic per
seed and molecule) -> one example per (molecule, conformer) with the canonical SMILES and
the enriched string. Molecules that fail to parse, embed or encode are skipped, counted
and listed in `build_report.json` next to the dataset. Train and validation come from
MOSES train, test from MOSES test.

Pipeline: examples -> conformer in `data.frame` with `data.decimals` decimals (`enriched.reframe`,
on the fly) -> token ids (+ <eot>) -> first-fit packing into rows of `seq_len`
with segment ids and per-segment positions -> batches. The global batch is split into
one stream per global device ("data" mesh index); each process builds only the streams of
its own devices, so the global batch is the same whatever the process layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import pathlib

import grain
import numpy as np
import tensorflow_datasets as tfds

from molgen.chem import enriched, moses
from molgen.core import streams as streams_lib
from molgen.core.records import as_str, build_once
from molgen.lm import tokenizer

SPLITS = ("train", "validation", "test")
log = logging.getLogger("molgen")


@dataclasses.dataclass
class MosesConfig(tfds.core.BuilderConfig):
    n_train: int = 1000
    n_val: int = 100
    n_test: int = 100
    conformers: int = 1
    test_conformers: int = 10
    seed: int = 0
    mmff: bool = True
    workers: int = 2
    source_train: str = ""  # a local CSV with a SMILES column instead of MOSES train (tests, custom sets)
    source_test: str = ""


def config_name(c) -> str:
    src = "".join(f"{p}" for p in (c.source_train, c.source_test) if p)
    tag = "_" + hashlib.sha1(src.encode()).hexdigest()[:8] if src else ""
    return (
        f"n{c.n_train}-{c.n_val}-{c.n_test}_c{c.conformers}-{c.test_conformers}"
        f"_s{c.seed}{'' if c.mmff else '_nommff'}{tag}"
    )


class MosesConformers(tfds.core.GeneratorBasedBuilder):
    """MOSES molecules with RDKit conformers as enriched-SMILES units."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MosesConfig(name="default")]

    def __init__(self, *, config: MosesConfig, **kw):
        super().__init__(config=config, **kw)
        self.failures: list[dict] = []
        self.counts: dict[str, dict] = {}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "smiles": tfds.features.Text(),
                    "enriched": tfds.features.Text(),
                    "mol_index": np.int64,
                    "conf_index": np.int64,
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        rng = np.random.default_rng(c.seed)
        train = moses.read_smiles("train", c.source_train or None)
        test = moses.read_smiles("test", c.source_test or None)
        if c.n_train + c.n_val > len(train) or c.n_test > len(test):
            raise ValueError(
                f"asked for {c.n_train}+{c.n_val} train/validation and {c.n_test} test molecules; "
                f"the sources have {len(train)} and {len(test)}"
            )
        pick = rng.permutation(len(train))[: c.n_train + c.n_val]
        test_pick = rng.permutation(len(test))[: c.n_test]
        jobs = {
            "validation": [(i, train[i]) for i in pick[: c.n_val]],
            "train": [(i, train[i]) for i in pick[c.n_val :]],
            "test": [(i, test[i]) for i in test_pick],
        }
        return {s: self._generate_examples(s, jobs[s]) for s in SPLITS}

    def _generate_examples(self, split, jobs):
        c = self.builder_config
        n_conf = c.test_conformers if split == "test" else c.conformers
        base = {"train": 0, "validation": 1, "test": 2}[split]
        work = [(split, int(i), smi, n_conf, c.seed * 1_000_003 + base * 7_919 + int(i), c.mmff) for i, smi in jobs]
        ok = 0
        with mp.get_context("spawn").Pool(max(1, c.workers)) as pool:
            for job, res in pool.imap(enriched.embed_job, work, chunksize=8):
                if isinstance(res, str):
                    src = (c.source_test if split == "test" else c.source_train) or f"MOSES {split}"
                    self.failures.append(
                        {"split": split, "source": src, "record": job[1], "smiles": job[2], "error": res}
                    )
                    continue
                ok += 1
                for ex in res:
                    yield f"{ex['mol_index']}_{ex['conf_index']}", ex
        self.counts[split] = {"molecules": len(jobs), "ok": ok, "failed": len(jobs) - ok}


def build(cfg, data_dir: str) -> MosesConformers:
    """Build (once) and return the builder for a `data` config group; writes build_report.json."""
    bc = MosesConfig(
        name="",
        n_train=cfg.n_train,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        conformers=cfg.conformers,
        test_conformers=cfg.test_conformers,
        seed=cfg.seed,
        mmff=cfg.mmff,
        workers=cfg.workers,
        source_train=cfg.source_train,
        source_test=cfg.source_test,
    )
    bc = dataclasses.replace(bc, name=config_name(bc))

    def finish(builder, out):
        report = out / "build_report.json"
        report.write_text(
            json.dumps(
                {"config": dataclasses.asdict(bc), "counts": builder.counts, "failures": builder.failures},
                indent=1,
                default=str,
            )
        )
        for f in builder.failures[:20]:
            log.warning("skipped %s record %d (%r): %s", f["source"], f["record"], f["smiles"], f["error"])
        if builder.failures:
            log.warning("%d molecules skipped in total; see %s", len(builder.failures), report)

    return build_once(MosesConformers, bc, data_dir, finish)


def report(builder) -> dict:
    return json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())


def data_knobs(dc) -> tuple[str, int]:
    """(frame, decimals) of a `data` config group, checked; "raw" / 4 where the group lacks them
    (configs written before these fields). Raises ValueError naming the key on a bad value."""
    frame = dc.frame if "frame" in dc else "raw"
    decimals = dc.decimals if "decimals" in dc else 4
    return check_knobs(frame, decimals)


def check_knobs(frame, decimals) -> tuple[str, int]:
    if frame not in enriched.FRAMES:
        raise ValueError(f"config.data.frame={frame!r}: expected one of {', '.join(map(repr, enriched.FRAMES))}")
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or decimals not in enriched.DECIMALS:
        raise ValueError(f"config.data.decimals={decimals!r}: expected an integer in {list(enriched.DECIMALS)}")
    return frame, int(decimals)


def unit_text(ex, frame: str = "raw", decimals: int = 4) -> str:
    """The training text of a dataset example, its conformer rewritten by `enriched.reframe`
    (the stored dataset stays raw at 4 decimals; evaluation references are read raw)."""
    return enriched.unit_text(as_str(ex["smiles"]), enriched.reframe(as_str(ex["enriched"]), frame, decimals))


def _tokenize(ex, pos_mode: str, frame: str = "raw", decimals: int = 4):
    text = unit_text(ex, frame, decimals)
    ids = np.concatenate([tokenizer.encode(text), [tokenizer.EOT_ID]]).astype(np.int32)
    return {"tokens": ids, "positions": tokenizer.positions(ids, pos_mode)}


def overlong(source, seq_len: int, frame: str = "raw", decimals: int = 4) -> list[int]:
    """mol_index of the units of `source` longer than `seq_len` tokens (with <eot>): the pipeline
    skips them instead of cutting them, and the run reports them (`data_report.json`)."""
    out = []
    for i in range(len(source)):
        ex = source[i]
        if len(tokenizer.encode(unit_text(ex, frame, decimals))) + 1 > seq_len:
            out.append(int(ex["mol_index"]))
    return out


def _stream(source, stream, n_streams, rows, seq_len, seed, train, bins, pos_mode, frame="raw", decimals=4):
    ds = streams_lib.device_stream(source, stream, n_streams, seed, train)
    ds = ds.map(lambda ex: _tokenize(ex, pos_mode, frame, decimals))
    ds = ds.filter(lambda t: len(t["tokens"]) <= seq_len)  # a unit is never cut; `overlong` counts them
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"tokens": seq_len, "positions": seq_len},
        num_packing_bins=max(rows, bins),
        seed=seed + stream,
        shuffle_bins=train,
    )
    return it.batch(rows, drop_remainder=True)


def _concat(rows):
    out = {k: np.concatenate([r[k] for r in rows], axis=0) for k in rows[0]}
    return {"tokens": out["tokens"], "segment_ids": out["tokens_segment_ids"], "positions": out["positions"]}


def pipeline(
    source,
    *,
    global_batch: int,
    seq_len: int,
    seed: int,
    streams: list[int],
    n_streams: int,
    train: bool = True,
    packing_bins: int = 16,
    pos_mode: str = "sequential",
    frame: str = "raw",
    decimals: int = 4,
) -> grain.IterDataset:
    """Packed batches of this process's streams: {"tokens","segment_ids","positions"} [rows, seq_len].

    `frame` / `decimals` (config `data.frame` / `data.decimals`) rewrite each conformer on the fly
    (`enriched.reframe`), so the dataset is not rebuilt for them."""
    frame, decimals = check_knobs(frame, decimals)
    rows = streams_lib.rows_per_stream(global_batch, n_streams)
    parts = [
        _stream(source, s, n_streams, rows, seq_len, seed, train, packing_bins, pos_mode, frame, decimals)
        for s in streams
    ]
    return grain.experimental.ZipIterDataset(parents=parts).map(_concat)
