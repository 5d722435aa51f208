"""CG molecular dynamics in JAX (jax-md), the in-JAX baseline for the LAMMPS path.

Units are LAMMPS `real`: Å, fs, kcal/mol, amu. jax-md integrates a = F / m, so masses enter as
m / ACCEL (ACCEL converts kcal/mol/Å/amu to Å/fs²). The loop is fully jitted: `record_every`
steps run inside `lax.fori_loop`, each updating the jax-md neighbour list (radius cutoff +
skin, rebuilt only when a bead moved more than skin / 2); the host only sees the recorded
frames and the overflow flag, and on an overflow it reallocates and repeats the chunk.

`python_loop` is the plain reference: velocity Verlet in numpy around the jitted force function.

`nve_check` (also `python -m molgen.cg.md --workdir=runs/cg_villin [--steps=10000 --dt=2]`) is
the cheap screen of a trained model before the LAMMPS experiment (experiments/cg_villin_md.py):
jax-md NVE from the folded structure with 300 K velocities, no export. It writes
<workdir>/nve_check.json: the total-energy drift per ns per bead and its largest jumps between
records (a discontinuity in the energy shows there, whatever the time step), the temperature,
and how the protein packs (CA pairs at sequence separation >= 3 closer than 7 Å, the closest
such pair, Rg) against the folded structure. Villin's quick model before the dihedral damping
of molgen.cg.priors: jumps of 0.4-5 kcal/mol; after: drift 0.025 and no jump above 0.04.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax_md import partition, simulate, space

from molgen.cg import export, lammps, neighbors, priors
from molgen.cg.energy import graph_energy
from molgen.cg.priors import KB
from molgen.core import cli

log = logging.getLogger("molgen")
ACCEL = 4.184e-4  # (kcal/mol/Å) / amu in Å/fs²


@dataclasses.dataclass(frozen=True)
class System:
    positions: np.ndarray  # [N, 3] Å, tag order
    species: np.ndarray  # [N]
    masses: np.ndarray  # [N] amu
    chains: list


def make_system(meta: dict, copies: int = 1, spacing: float = 60.0, positions=None) -> System:
    x, resnames, species, chains, masses = lammps.system(meta, copies, spacing, positions=positions)
    return System(x, species, np.asarray([masses[r] for r in resnames]), chains)


def energy_factory(model, nn_params, prior_params, sys: System, skin: float = 0.5, capacity_multiplier=1.25,
                   use_net: bool = True):  # fmt: skip
    """(energy(x, nbrs), neighbour_fn) of the whole system (free space; copies are chains);
    use_net=False: the priors alone (the neighbour list is then kept but unused)."""
    cutoff = float(model.net.cutoff)
    displacement, _ = space.free()
    # a cell list over the system's extent (plus room to move) once all-pairs candidates cost more
    # than the model; positions outside it only hash into wrapped cells (more candidates, same pairs)
    extent = float(np.ptp(sys.positions, axis=0).max()) + 4 * (cutoff + skin)
    fn = partition.neighbor_list(displacement, extent, cutoff + skin, dr_threshold=skin,
                                 capacity_multiplier=capacity_multiplier, disable_cell_list=len(sys.positions) < 512,
                                 format=partition.Sparse)  # fmt: skip
    topo = {k: jnp.asarray(v) for k, v in priors.topology(len(sys.positions), sys.chains).items()}
    pp = priors.as_jax(prior_params)
    species = jnp.asarray(sys.species)
    mask = jnp.ones(len(sys.positions), bool)

    def energy(x, neighbor, params=None):  # params: other network parameters (relent samples while it trains)
        edges = neighbors.edges(neighbor.idx, x.shape[0]) if use_net else None
        return graph_energy(model, nn_params if params is None else params, pp, x, species, mask, edges, topo)[0]

    return energy, fn


def run(model, nn_params, prior_params, sys: System, *, ensemble="nvt", temperature=300.0, dt=2.0, steps=1000,
        gamma=1 / 500.0, seed=0, record_every=100, use_net=True):  # fmt: skip
    """Fully jitted jax-md MD; returns (frames [steps // record_every, N, 3], energies, seconds).
    use_net=False runs the priors alone."""
    energy, nfn = energy_factory(model, nn_params, prior_params, sys, use_net=use_net)
    _, shift = space.free()
    kT = KB * temperature
    mass = jnp.asarray(sys.masses / ACCEL, jnp.float32)[:, None]
    if ensemble == "nvt":
        init, apply = simulate.nvt_langevin(energy, shift, dt, kT, gamma=gamma)
    elif ensemble == "nve":
        init, apply = simulate.nve(energy, shift, dt)
    else:
        raise ValueError(f"ensemble must be 'nve' or 'nvt', got {ensemble!r}")
    x0 = jnp.asarray(sys.positions, jnp.float32)
    nbrs = nfn.allocate(x0)
    state = init(jax.random.key(seed), x0, mass=mass, kT=kT, neighbor=nbrs)

    def make_chunk(nfn):
        @jax.jit
        def chunk(state, nbrs):
            def body(_, carry):
                s, nb = carry
                s = apply(s, neighbor=nb)
                return s, nfn.update(s.position, nb)

            state, nbrs = jax.lax.fori_loop(0, record_every, body, (state, nbrs))
            ke = 0.5 * jnp.sum(state.mass * state.momentum**2 / state.mass**2)
            return state, nbrs, energy(state.position, nbrs), ke

        return chunk

    chunk = make_chunk(nfn)
    frames, energies = [], []
    t0, compiled = time.perf_counter(), None
    n_chunks = max(1, steps // record_every)
    while len(frames) < n_chunks:
        new_state, new_nbrs, pe, ke = chunk(state, nbrs)
        if bool(new_nbrs.did_buffer_overflow):  # grow the list and redo the chunk from its start
            nbrs = neighbors.grow(nfn, state.position, nbrs)
            continue
        state, nbrs = new_state, new_nbrs
        if compiled is None:
            compiled = time.perf_counter()
        frames.append(np.asarray(state.position))
        energies.append((float(pe), float(ke)))
        if len(frames) % max(1, n_chunks // 10) == 0:
            log.info("jax-md: %d/%d steps, %.0f s", len(frames) * record_every, n_chunks * record_every,
                     time.perf_counter() - t0)  # fmt: skip
    wall = time.perf_counter() - (compiled or t0)
    timed_steps = (len(frames) - 1) * record_every
    return np.stack(frames), np.asarray(energies), {"seconds": wall, "timed_steps": timed_steps}


def python_loop(ff, sys: System, *, dt=2.0, steps=100, temperature=300.0, seed=0):
    """Velocity Verlet (NVE) in numpy around `ff(positions) -> (energy, forces, virial)`."""
    rng = np.random.default_rng(seed)
    m = sys.masses[:, None] / ACCEL
    x = np.asarray(sys.positions, np.float64)
    v = rng.normal(size=x.shape) * np.sqrt(KB * temperature / m)
    _, f, _ = ff(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        v += 0.5 * dt * f / m
        x = x + dt * v
        _, f, _ = ff(x)
        v += 0.5 * dt * f / m
    return x, time.perf_counter() - t0


def jitted_forces(model, nn_params, prior_params, sys: System):
    """ff(positions) -> (energy, forces, virial) with the export's graph convention, jitted in
    this process (no serialization): the force function the Python loop calls."""
    f = jax.jit(export.energy_fn(model, nn_params, prior_params))
    topo = export.topology_arrays(sys.chains)
    cutoff = float(model.net.cutoff)

    def ff(x):
        snd, rcv = lammps.neighbour_pairs(x, cutoff)
        e, forces, w = f(jnp.asarray(x, jnp.float32), jnp.asarray(sys.species), snd, rcv, topo)
        return float(e), np.asarray(forces, np.float64), np.asarray(w)

    return ff


def packing(x_Nx3, min_sep: int = 3, close: float = 7.0) -> dict:
    """CA pairs at sequence separation >= min_sep closer than `close` Å, the closest, and Rg."""
    n = len(x_Nx3)
    d = np.linalg.norm(x_Nx3[:, None] - x_Nx3[None], axis=-1)[np.triu_indices(n, min_sep)]
    rg = np.sqrt(np.mean(np.sum((x_Nx3 - x_Nx3.mean(0)) ** 2, -1)))
    return {"close_pairs": int((d < close).sum()), "closest": float(d.min()), "rg": float(rg)}


def nve_check(workdir: str, steps: int = 10000, dt: float = 2.0, record_every: int = 50, seed: int = 0) -> dict:
    """jax-md NVE screen of a trained CG workdir (see the module docstring); writes nve_check.json."""
    config, model, nn_params, prior_params, _ = export.load_trained(workdir)
    meta = export.system_metadata(config)
    sys = make_system(meta)
    frames, energies, timing = run(model, nn_params, prior_params, sys, ensemble="nve", dt=dt, steps=steps,
                                   record_every=record_every, seed=seed)  # fmt: skip
    n = len(sys.positions)
    total = energies.sum(1)
    t_ns = np.arange(1, len(total) + 1) * record_every * dt * 1e-6
    temp = 2 * energies[:, 1] / (3 * n - 6) / KB
    jumps = np.diff(total)
    big = np.argsort(-np.abs(jumps))[:3]
    out = {
        "workdir": str(pathlib.Path(workdir).absolute()), "steps": steps, "dt_fs": dt, "seed": seed,
        "drift_kcal_per_mol_per_ns_per_bead": float(np.polyfit(t_ns, total, 1)[0] / n),
        "etotal_range": float(np.ptp(total)),
        "largest_jumps": [{"step": int((i + 2) * record_every), "de": float(jumps[i])} for i in big],
        "temperature": {"first": float(temp[0]), "max": float(temp.max()),
                        "last_tenth": float(temp[-max(1, len(temp) // 10):].mean())},
        "packing_folded": packing(np.asarray(meta["proteins"][0]["folded"])),
        "packing_last": packing(frames[-1]),
        "ns_per_day": timing["timed_steps"] * dt * 1e-6 / max(timing["seconds"], 1e-9) * 86400,
    }  # fmt: skip
    pathlib.Path(workdir, "nve_check.json").write_text(json.dumps(out, indent=2))
    return out


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: molgen.main defines --workdir too)."""
    flags.DEFINE_string("workdir", None, "a trained CG workdir (writes nve_check.json)", required=True, flag_values=fv)
    flags.DEFINE_integer("steps", 10000, "NVE steps", flag_values=fv)
    flags.DEFINE_float("dt", 2.0, "time step (fs)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "velocity seed", flag_values=fv)
    return fv


def _cli(a, argv):
    print(json.dumps(nve_check(a.workdir, a.steps, a.dt, seed=a.seed), indent=2))


def main(argv=None):
    """The CLI in this process: main(["--workdir=X", "--steps=200"]); None: from the shell."""
    cli.run("molgen.cg.md", _flags, _cli, argv)


if __name__ == "__main__":
    main()
