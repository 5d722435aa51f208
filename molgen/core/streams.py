"""Per-device data streams shared by every family's Grain pipeline.

The global batch is split into one stream per global device ("data" mesh index); each process
builds only the streams of its own devices, so the global batch is the same whatever the
process layout.
"""

from __future__ import annotations

import grain


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
