"""Per-device data streams shared by every family's Grain pipeline.

The global batch is split into one stream per global device ("data" mesh index); each process
builds only the streams of its own devices, so the global batch is the same whatever the
process layout.
"""

from __future__ import annotations

import grain
import numpy as np


def rows_per_stream(global_batch: int, n_streams: int) -> int:
    if global_batch % n_streams:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n_streams} data-parallel devices")
    return global_batch // n_streams


def device_stream(source, stream: int, n_streams: int, seed: int, train: bool) -> grain.MapDataset:
    """Examples of one device stream: every n_streams-th example, shuffled per stream when
    training, repeated forever (validation too, so every process runs the same eval steps)."""
    if len(source) == 0:
        raise ValueError("the dataset split is empty: every record failed to build (see build_report.json)")
    ds = grain.MapDataset.source(source)
    if len(ds) < n_streams:  # tiny splits: repeat so that every device stream gets examples
        ds = ds.repeat(-(-n_streams // len(ds)))
    ds = ds[stream::n_streams]
    if train:
        ds = ds.shuffle(seed=seed + 1009 * stream)
    return ds.repeat(None)


def array_pipeline(source, keys, *, global_batch: int, seed: int, streams, n_streams: int, train: bool = True):
    """This process's rows of the global batch for fixed-shape array records: one device stream
    per entry of `streams` (the process's mesh indices), `keys` kept, concatenated in mesh order."""
    rows = rows_per_stream(global_batch, n_streams)

    def one(stream):
        ds = device_stream(source, stream, n_streams, seed, train)
        ds = ds.map(lambda ex: {k: np.asarray(ex[k]) for k in keys})
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)).batch(
            rows, drop_remainder=True
        )

    return grain.experimental.ZipIterDataset(parents=[one(s) for s in streams]).map(
        lambda xs: {k: np.concatenate([x[k] for x in xs]) for k in xs[0]}
    )
