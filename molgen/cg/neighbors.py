"""jax-md neighbour lists for batches of CG frames, with a fixed capacity that the host grows.

Sparse format: `idx` [2, capacity] holds (centre, neighbour) pairs in both directions, padded
with N. `did_buffer_overflow` is set when a frame has more pairs than the capacity; `update`
then raises `Overflow` instead of dropping pairs, and `batch` reallocates with more room.
Free space uses an all-pairs candidate search (no cell list: parked beads are far away and
would blow up the cell grid); periodic boxes use jax-md's cell list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax_md import partition, space


class Overflow(RuntimeError):
    """A neighbour list ran out of capacity; reallocate and recompute."""


def neighbor_fn(cutoff: float, box=None, capacity_multiplier: float = 1.25):
    if box is None:
        displacement, _ = space.free()
        return partition.neighbor_list(
            displacement, 1.0, cutoff, capacity_multiplier=capacity_multiplier, disable_cell_list=True,
            format=partition.Sparse,
        )  # fmt: skip
    displacement, _ = space.periodic(box)
    return partition.neighbor_list(
        displacement, box, cutoff, capacity_multiplier=capacity_multiplier, format=partition.Sparse
    )


def allocate(fn, positions_BxNx3, extra: int = 0):
    """Neighbour lists of a batch, all with the capacity of the densest frame (+ extra)."""
    per_frame = [fn.allocate(p) for p in positions_BxNx3]
    cap = max(n.idx.shape[1] for n in per_frame) + extra
    frames = [
        fn.allocate(p, extra_capacity=cap - n.idx.shape[1]) for p, n in zip(positions_BxNx3, per_frame, strict=True)
    ]
    return jax.tree.map(lambda *x: jnp.stack(x), *frames)


def update(fn, positions_BxNx3, nbrs):
    """Recompute the batch's lists at the same capacity (jittable); check `overflowed` after."""
    return jax.vmap(lambda p, n: fn.update(p, n))(positions_BxNx3, nbrs)


def overflowed(nbrs) -> bool:
    return bool(jnp.any(nbrs.did_buffer_overflow))


def batch(fn, positions_BxNx3, nbrs=None, grow: float = 1.5):
    """Lists for a batch: update the given ones; if any frame overflows, reallocate bigger.
    Never drops a pair silently."""
    if nbrs is not None:
        new = update(fn, positions_BxNx3, nbrs)
        if not overflowed(new):
            return new
        extra = int(nbrs.idx.shape[-1] * (grow - 1))
    else:
        extra = 0
    new = allocate(fn, positions_BxNx3, extra)
    if overflowed(new):
        raise Overflow("neighbour list overflowed right after allocation")
    return new


def edges(nbrs_idx_2xE, n: int):
    """(centres, neighbours, valid) of a sparse list; padding entries point at n."""
    centres, neighbours = nbrs_idx_2xE[0], nbrs_idx_2xE[1]
    valid = (centres < n) & (neighbours < n)
    return jnp.where(valid, centres, 0), jnp.where(valid, neighbours, 0), valid
