"""The one data-parallel step builder every family trains with.

A family supplies `loss_fn(params, batch, rng) -> (loss_sum, aux)` where `aux["weight"]`
is the number of items (tokens, frames) the sum runs over and every other entry of
`aux` is a sum over the same items. The step runs under `shard_map` over the mesh's
"data" axis: each device sees its slice of the global batch, the global weight is
psum'ed, each device's loss is divided by it, and gradients are pmean'ed (times the
device count) so the update is exactly the gradient of the global per-item mean, no
matter how the batch is split across processes and devices.

Post-training steps need more than params and a batch: `with_ctrl=True` adds a replicated
fourth argument `ctrl` (e.g. this step's DPO beta, or frozen reference parameters) that
`loss_fn(params, batch, rng, ctrl)` receives, and two outputs: `aux["rows"]` (per-row arrays,
returned as global arrays sharded over "data", e.g. per-pair margins) and `aux["state"]`
(values already equal on every device, returned as they are, e.g. an EMA computed from
all-gathered margins).

Every step reports `grad_norm` and `params_finite` (1.0 when every updated parameter is finite)
beside the loss, so the host's NaN guard (`logging.check_finite`) sees a NaN gradient or a
non-finite update even when the loss is finite.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx):
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def _global_mean(aux):
    """psum every aux sum and divide by the global weight."""
    weight = jax.lax.psum(aux["weight"], AXIS)
    out = {k: jax.lax.psum(v, AXIS) / jnp.maximum(weight, 1e-9) for k, v in aux.items() if k != "weight"}
    out["weight"] = weight
    return out


def all_finite(tree) -> jax.Array:
    """1.0 if every leaf of `tree` is finite, else 0.0 (a float, so it travels with the metrics)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.float32(1.0)


def make_train_step(loss_fn: Callable, mesh, *, extra_metrics: Callable | None = None, with_ctrl: bool = False):
    """jit(shard_map(step)) with donated state: (state, batch, rng) -> (state, metrics), or with
    `with_ctrl` (state, batch, rng, ctrl) -> (state, metrics, rows, ctrl_state)."""
    n_dev = mesh.shape[AXIS]

    def step(state: TrainState, batch, rng, ctrl=None):
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))

        def scaled(params):
            loss_sum, aux = loss_fn(params, batch, rng, ctrl) if with_ctrl else loss_fn(params, batch, rng)
            w = jax.lax.psum(jax.lax.stop_gradient(aux["weight"]), AXIS)
            return loss_sum / jnp.maximum(w, 1e-9) * n_dev, aux

        (_, aux), grads = jax.value_and_grad(scaled, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rows, ctrl_state = aux.pop("rows", {}), aux.pop("state", {})
        metrics = _global_mean(aux)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["params_finite"] = all_finite(params)
        if extra_metrics is not None:
            metrics.update(extra_metrics(state, grads))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return (new_state, metrics, rows, ctrl_state) if with_ctrl else (new_state, metrics)

    if with_ctrl:
        specs = dict(in_specs=(P(), P(AXIS), P(), P()), out_specs=(P(), P(), P(AXIS), P()))
    else:
        specs = dict(in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
    return jax.jit(jax.shard_map(step, mesh=mesh, check_vma=False, **specs), donate_argnums=(0,))


def make_eval_step(loss_fn: Callable, mesh):
    """jit(shard_map(eval)): (params, batch, rng) -> metrics averaged over the global batch."""

    def step(params, batch, rng):
        _, aux = loss_fn(params, batch, rng)
        aux.pop("rows", None), aux.pop("state", None)
        return _global_mean(aux)

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False))


def make_row_fn(fn: Callable, mesh):
    """jit(shard_map(fn)) for per-row outputs (log-probs, scores): (params, batch) -> arrays
    sharded over "data" like the batch."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False))


def replicate(tree, mesh):
    """Place a host pytree on every device of the mesh (same value everywhere)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(local_batch, mesh):
    """Assemble a global array sharded over "data" from this process's rows."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
