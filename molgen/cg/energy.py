"""The CG energy model: E(x) = priors(x) + Allegro(x) on a jax-md neighbour list; forces are
-dE/dx, the virial -dE/d(strain).

`Model` holds what the energy needs besides the parameters (network, prior topology,
neighbour-list function and template, prior term weights, box). `model.box` > 0 puts the beads
in a cubic periodic box (minimum-image geometry in the priors and in Allegro, jax-md cell
lists). `resolve_model_config` fixes the data-dependent settings (inner cutoff, neighbour
capacity) and records them in <workdir>/model.json, which `export.load_trained` reads back.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from molgen.cg import allegro, data, neighbors, priors
from molgen.core import loop


def pair_stats(positions_FxNx3, mask_FxN, cutoff: float) -> tuple[int, float]:
    """(largest number of directed pairs within the cutoff in any frame, shortest pair distance
    in any frame) over real beads (host, exact)."""
    best, shortest = 0, np.inf
    for x, m in zip(positions_FxNx3, mask_FxN, strict=True):
        x = x[m]
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        best = max(best, int((d < cutoff).sum() - len(x)))
        shortest = min(shortest, float(d[np.triu_indices(len(x), 1)].min()))
    return best, shortest


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything the energy needs besides the parameters (static under jit)."""

    net: allegro.Allegro
    topo: dict
    nbr_fn: object
    nbr_template: object  # a NeighborList of the fixed capacity
    weights: dict
    excluded: bool
    box: float = 0.0  # cubic periodic box edge in Å; 0 = free space
    members: int = 0  # > 0: nn_params carry a leading axis of that many ensemble members, energy = their mean

    def __hash__(self):
        return id(self)

    def displacement(self, strain=None):
        """jax-md displacement of this space (None = plain differences), optionally strained:
        every displacement vector d becomes (1 + strain) d, whose energy derivative is the virial."""
        base = space.periodic(self.box)[0] if self.box else None
        if strain is None:
            return base
        t = jnp.eye(3, dtype=strain.dtype) + strain
        return lambda a, b: t @ (base(a, b) if base is not None else a - b)

    def wrap(self, positions):
        """Positions the neighbour list sees: wrapped into the box when periodic."""
        return jnp.mod(positions, self.box) if self.box else positions


def make_net(mc, inner_cutoff: float) -> allegro.Allegro:
    """The Allegro network of a `model` config group (the inner cutoff already resolved)."""
    return allegro.Allegro(
        n_species=20, cutoff=mc.cutoff, n_basis=mc.n_basis, n_layers=mc.n_layers, latent=mc.latent,
        channels=mc.channels, lmax=mc.lmax, embed=mc.embed, mlp_depth=mc.mlp_depth, avg_neighbors=mc.avg_neighbors,
        env_norm=mc.env_norm, inner_cutoff=inner_cutoff, inner_width=float(mc.inner_width),
    )  # fmt: skip


def make_model(config, n_max: int, capacity: int, example_positions) -> Model:
    mc = config.model
    net = make_net(mc, _inner(mc))
    box = float(mc.box)
    fn = neighbors.neighbor_fn(mc.cutoff, box=box or None)
    x0 = jnp.mod(jnp.asarray(example_positions), box) if box else jnp.asarray(example_positions)
    first = fn.allocate(x0)
    template = neighbors.with_capacity(first, max(capacity, first.idx.shape[1]))
    pc = config.priors
    weights = {k: float(pc.weights[k]) for k in priors.TERMS}
    return Model(net, priors.topology(n_max), fn, template, weights, bool(pc.excluded_volume), box)


def graph_energy(model: Model, nn_params, prior_params, positions, species, mask, edges=None, topo=None, strain=None):
    """Total energy and per-term parts of one frame given its neighbour graph `edges` =
    (centres, neighbours, valid) (None: priors only) and prior topology (default the model's).
    `strain` [3, 3] deforms every displacement (for the virial; see `frame_forces_virial`)."""
    disp = model.displacement(strain)
    topo = model.topo if topo is None else topo
    terms = priors.term_energies(prior_params, positions, mask, topo, model.weights, model.excluded, disp)
    if edges is not None:
        c, n, v = edges
        v = v & mask[c] & mask[n]

        def net(p):
            return model.net.apply({"params": p}, positions, species, c, n, v, displacement=disp)

        e_bead = jnp.mean(jax.vmap(net)(nn_params), 0) if model.members else net(nn_params)
        terms["allegro"] = jnp.sum(e_bead * mask)
    return sum(terms.values()), terms


def _inner(mc) -> float:
    v = float(mc.inner_cutoff)
    if v < 0:
        raise ValueError("model.inner_cutoff < 0 (auto) must be resolved from the data first (train_and_evaluate)")
    return v


def resolve_model_config(config, workdir, splits) -> tuple:
    """(config with model.inner_cutoff resolved, neighbour capacity), both from every frame of
    the dataset and saved in <workdir>/model.json, which export.load_trained reads back."""
    mc = config.model
    all_pos = np.concatenate([splits[s]["positions"] for s in data.SPLITS])
    all_mask = np.concatenate([splits[s]["mask"] for s in data.SPLITS])
    pairs, shortest = pair_stats(all_pos, all_mask, mc.cutoff)
    capacity = int(pairs * mc.capacity_multiplier) + 8
    inner = float(mc.inner_cutoff)
    if inner < 0:  # the switch reaches 0 at the shortest distance of the data (see allegro.inner_switch)
        inner = round(shortest + float(mc.inner_width), 3)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.inner_cutoff = inner
    loop.write_json(workdir, "model.json", {"inner_cutoff": inner, "shortest_pair_distance": shortest,
                                            "capacity": capacity, "n_max": int(all_pos.shape[1])})  # fmt: skip
    return config, capacity


def frame_energy(model: Model, nn_params, prior_params, positions, species, mask, use_net=True, strain=None):
    """Total energy of one frame, its per-term parts, and the neighbour-list overflow flag."""
    edges, overflow = None, jnp.zeros((), bool)
    if use_net:
        nbrs = model.nbr_fn.update(model.wrap(positions), model.nbr_template)
        edges = neighbors.edges(nbrs.idx, positions.shape[0])
        overflow = nbrs.did_buffer_overflow
    total, terms = graph_energy(model, nn_params, prior_params, positions, species, mask, edges, strain=strain)
    return total, terms, overflow


def frame_forces(model, nn_params, prior_params, positions, species, mask, use_net=True):
    def e(x):
        total, _, overflow = frame_energy(model, nn_params, prior_params, x, species, mask, use_net)
        return total, overflow

    (energy, overflow), grad = jax.value_and_grad(e, has_aux=True)(positions)
    return energy, -grad, overflow


def frame_forces_virial(model, nn_params, prior_params, positions, species, mask, use_net=True):
    """(energy, forces [N, 3], virial [3, 3], overflow). The virial is W = -dE/d(strain) at zero
    strain, in kcal/mol (LAMMPS' sum over pairs of r_ij F_ij; in free space it equals
    sum_i x_i F_i^T); pressure = (N k T + tr W / 3) / V."""

    def e(x, strain):
        total, _, overflow = frame_energy(model, nn_params, prior_params, x, species, mask, use_net, strain)
        return total, overflow

    (energy, overflow), (gx, gs) = jax.value_and_grad(e, argnums=(0, 1), has_aux=True)(
        positions, jnp.zeros((3, 3), positions.dtype)
    )
    return energy, -gx, -gs, overflow


def init_net(model: Model, seed: int, example):
    c, n, v = neighbors.edges(model.nbr_template.idx, example["positions"].shape[0])
    x = jnp.asarray(example["positions"])
    return model.net.init(jax.random.key(seed), x, jnp.asarray(example["species"]), c, n, v)["params"]
