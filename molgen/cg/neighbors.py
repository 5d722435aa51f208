"""jax-md neighbour lists for batches of CG frames, with a fixed capacity that the host grows.

Sparse format: `idx` [2, capacity] holds (centre, neighbour) pairs in both directions, padded
with N. `did_buffer_overflow` is set when a frame has more pairs than the capacity; `update`
then raises `Overflow` instead of dropping pairs, and `batch` reallocates with more room.
Free space uses an all-pairs candidate search (no cell list: parked beads are far away and
would blow up the cell grid); periodic boxes use jax-md's cell list.
"""

from __future__ import annotations

import dataclasses

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


def with_capacity(nbrs, capacity: int):
    """`nbrs` (sparse) holding exactly `capacity` pairs (padded with N), kept by its updates.
    jax-md's `allocate(extra_capacity=k)` adds k pairs per particle for sparse lists, N x what a
    caller asking for k more pairs wants, so capacities are set here instead."""
    have = nbrs.idx.shape[1]
    if capacity < have:
        raise ValueError(f"capacity {capacity} is below the {have} pairs the list already holds")
    n = nbrs.reference_position.shape[0]
    pad = jnp.full((2, capacity - have), n, nbrs.idx.dtype)
    return dataclasses.replace(nbrs, idx=jnp.concatenate([nbrs.idx, pad], 1), max_occupancy=capacity)


def grow(fn, position, nbrs, factor: float = 1.5):
    """A list for `position` after `nbrs` overflowed: `factor` x its capacity, or what the
    positions need now if that is more (never past all N(N-1) pairs)."""
    fresh = fn.allocate(position)
    n = position.shape[0]
    return with_capacity(fresh, max(fresh.idx.shape[1], min(int(nbrs.idx.shape[1] * factor), n * (n - 1))))


def allocate(fn, positions_BxNx3, extra: int = 0):
    """Neighbour lists of a batch, all with the capacity of the densest frame (+ extra)."""
    per_frame = [fn.allocate(p) for p in positions_BxNx3]
    cap = max(n.idx.shape[1] for n in per_frame) + extra
    return jax.tree.map(lambda *x: jnp.stack(x), *(with_capacity(n, cap) for n in per_frame))


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
