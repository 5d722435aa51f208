"""mdCATH HDF5 files (REFERENCE.md section 2): read, write, and map to one bead per residue.

Layout of `mdcath_dataset_<dom>.h5`, as published:

    attrs: layout = "mdcath-only-protein-v1.0"
    /<dom>                      attrs numChains, numProteinAtoms, numResidues
        chain, element, resid, resname, z     per-atom datasets
        pdb, pdbProteinAtoms, psf             text
        /<temp K>/<replica>/                  attrs numFrames
            coords (F, N, 3) Å, forces (F, N, 3) kcal/mol/Å, box (3, 3) nm,
            rmsd, gyrationRadius, rmsf, dssp

The atoms of `coords` are those of `pdbProteinAtoms`, in order. Residues and CA atoms are
taken from that PDB text, so a real mdCATH file works unchanged.

A CG frame has one bead per residue at its CA; the bead force is the sum of the all-atom forces
of the residue (REFERENCE.md: a valid aggregation for a CA slice mapping).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

LAYOUT = "mdcath-only-protein-v1.0"
MAPPED_LAYOUT = "molgen-cg-mapped-v1"  # CA positions and bead forces only: molgen.cg.mapped
AMINO_ACIDS = (
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL".split()
)  # species index = position in this tuple; saved with every dataset
ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
           "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "MSE": "MET"}  # fmt: skip


class MdcathError(ValueError):
    """A file, domain, temperature or replica that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """Residues of one domain, from its `pdbProteinAtoms` text."""

    domain: str
    resnames: tuple  # per residue, canonical 3-letter names
    species: np.ndarray  # [R] int32 index into AMINO_ACIDS
    atom_residue: np.ndarray  # [N] residue index of each atom
    ca_index: np.ndarray  # [R] atom index of each residue's CA


@dataclasses.dataclass(frozen=True)
class CGTrajectory:
    domain: str
    temperature: int
    replica: int
    species: np.ndarray  # [R]
    positions: np.ndarray  # [F, R, 3] Å
    forces: np.ndarray  # [F, R, 3] kcal/mol/Å
    skipped_frames: tuple = ()  # frame indices dropped (NaN), when asked to skip


def _text(x) -> str:
    x = x[()] if hasattr(x, "shape") else x
    if isinstance(x, np.ndarray):
        x = x.item() if x.shape == () else b"".join(x.tolist())
    return x.decode() if isinstance(x, bytes) else str(x)


def parse_topology(pdb_text: str, domain: str, where: str = "") -> Topology:
    """Residues in order of appearance (chain, resSeq, iCode) and the CA of each.

    Raises MdcathError naming the domain (or `where`) and residue if a residue has no CA or an
    unknown type."""
    keys, resnames, atom_residue, ca = [], [], [], {}
    for line in pdb_text.splitlines():
        if not line.startswith(("ATOM", "HETATM")):
            continue
        key = (line[21], line[22:27])  # chain, resSeq + insertion code
        if not keys or keys[-1] != key:
            keys.append(key)
            resnames.append(line[17:20].strip())
        atom_residue.append(len(keys) - 1)
        if line[12:16].strip() == "CA":
            ca[len(keys) - 1] = len(atom_residue) - 1
    if not keys:
        raise MdcathError(f"{where or f'domain {domain}: '}no ATOM records in pdbProteinAtoms")
    species = []
    for i, (key, name) in enumerate(zip(keys, resnames, strict=True)):
        label = f"{where or f'domain {domain}: '}residue {name} {key[0]}{key[1].strip()} (#{i})"
        if i not in ca:
            raise MdcathError(f"{label} has no CA atom")
        name = ALIASES.get(name, name)
        if name not in AMINO_ACIDS:
            raise MdcathError(f"{label} is not one of the 20 amino acids")
        species.append(AMINO_ACIDS.index(name))
    return Topology(
        domain=domain,
        resnames=tuple(AMINO_ACIDS[s] for s in species),
        species=np.asarray(species, np.int32),
        atom_residue=np.asarray(atom_residue, np.int32),
        ca_index=np.asarray([ca[i] for i in range(len(keys))], np.int64),
    )


def ca_positions(pdb_text: str, topology: Topology) -> np.ndarray:
    """CA coordinates [R, 3] (Å) of the structure in the PDB text (the starting, folded one)."""
    xyz = [
        (float(line[30:38]), float(line[38:46]), float(line[46:54]))
        for line in pdb_text.splitlines()
        if line.startswith(("ATOM", "HETATM"))
    ]
    return np.asarray(xyz, np.float64)[topology.ca_index]


def atom_elements(pdb_text: str) -> np.ndarray:
    """Element symbol of each atom of a PDB text (columns 77-78, else the atom name's first letter)."""
    out = []
    for line in pdb_text.splitlines():
        if line.startswith(("ATOM", "HETATM")):
            el = line[76:78].strip() if len(line) >= 78 else ""
            out.append((el or line[12:16].strip().lstrip("0123456789")[:1]).upper())
    return np.asarray(out)


def coarse_grain(topology: Topology, coords_FxNx3, forces_FxNx3, weights=None):
    """CA positions [F, R, 3] and bead forces [F, R, 3]: the residue sums, or `weights` [R, N]
    applied to the all-atom forces (a force map, see `molgen.cg.forcemap`)."""
    pos = np.asarray(coords_FxNx3)[:, topology.ca_index]
    forces = np.asarray(forces_FxNx3, np.float64)
    if weights is not None:
        return pos.astype(np.float32), np.einsum("rn,fnd->frd", weights, forces).astype(np.float32)
    summed = np.zeros((forces.shape[0], len(topology.ca_index), 3))
    np.add.at(summed, (slice(None), topology.atom_residue), forces)
    return pos.astype(np.float32), summed.astype(np.float32)


def domains(path: str) -> list[str]:
    import h5py

    with h5py.File(path, "r") as f:
        return [k for k in f.keys()]


def is_mapped(path: str) -> bool:
    """Whether `path` is a CA-mapped file (`MAPPED_LAYOUT`, written by `molgen.cg.mapped`)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return _text(f.attrs.get("layout", b"")) == MAPPED_LAYOUT
    except OSError as e:
        raise MdcathError(f"{path}: not a readable HDF5 file ({e})") from e


def _finite(label, on_nan, *arrays):
    """The mask of frames whose arrays are all finite; raises (on_nan="error") naming the first bad frame."""
    ok = np.all([np.isfinite(a).all(axis=tuple(range(1, a.ndim))) for a in arrays], axis=0)
    if not ok.all() and on_nan == "error":
        frames = np.flatnonzero(~ok)
        raise MdcathError(f"{label}: non-finite coords or forces in {len(frames)} frame(s), first frame "
                          f"{frames[0]} (set on_nan='skip' to drop such frames)")  # fmt: skip
    return ok


def _groups(f, name, temperatures, replicas):
    """(domain, temperature, replica, label, domain group, run group) of an open file, in order."""
    for dom in f.keys():
        g = f[dom]
        if "pdbProteinAtoms" not in g:
            raise MdcathError(f"{name}: domain {dom}: no pdbProteinAtoms text")
        for temp in sorted((k for k in g.keys() if k.isdigit()), key=int):
            if temperatures is not None and int(temp) not in temperatures:
                continue
            for rep in sorted(g[temp].keys(), key=int):
                if replicas is None or int(rep) in replicas:
                    label = f"{name}: domain {dom}, temperature {temp} K, replica {rep}"
                    yield dom, int(temp), int(rep), label, g, g[temp][rep]


def read_mapped(path: str, on_nan: str = "error", temperatures=None, replicas=None):
    """Yield a CGTrajectory per run of a CA-mapped file, checked as `read_cg` says."""
    import h5py

    if on_nan not in ("error", "skip"):
        raise ValueError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
    with h5py.File(path, "r") as f:
        for dom, temp, rep, label, g, run in _groups(f, os.path.basename(path), temperatures, replicas):
            top = parse_topology(_text(g["pdbProteinAtoms"]), dom, where=label + ": ")
            for key in ("caCoords", "beadForces"):
                if key not in run:
                    raise MdcathError(f"{label}: no {key} dataset")
            pos, frc = run["caCoords"][()], run["beadForces"][()]
            if pos.shape[1:] != (len(top.ca_index), 3) or frc.shape != pos.shape:
                raise MdcathError(f"{label}: caCoords {pos.shape} and beadForces {frc.shape} do not match the "
                                  f"{len(top.ca_index)} residues of pdbProteinAtoms")  # fmt: skip
            ok = _finite(label, on_nan, pos, frc)
            yield CGTrajectory(dom, temp, rep, top.species, pos[ok].astype(np.float32), frc[ok].astype(np.float32),
                               tuple(np.flatnonzero(~ok).tolist()))  # fmt: skip


def stored_force_maps(path: str) -> dict:
    """{domain: W [R, N]}: the force maps a CA-mapped file's bead forces were made with."""
    import h5py

    with h5py.File(path, "r") as f:
        return {d: f[d]["forceMap"][()] for d in f.keys() if "forceMap" in f[d]}


def provenance(path: str) -> str:
    """The provenance JSON text of a CA-mapped file ("{}" for others)."""
    import h5py

    with h5py.File(path, "r") as f:
        return _text(f.attrs.get("provenance", b"{}"))


def atom_frames(path: str, domain: str, temperature: int):
    """The (replica, frame) pairs whose all-atom coordinates a file holds: None for all of them
    (an all-atom file), else those a CA-mapped file kept."""
    import h5py

    with h5py.File(path, "r") as f:
        g = f[domain][str(temperature)]
        if all("coords" in g[r] for r in g):
            return None
        return {(int(r), int(i)) for r in g for i in g[r]["atomFrames"][()]}


def atom_coords(path: str, domain: str, temperature: int, replica: int, frame: int):
    """All-atom coordinates [N, 3] of one frame, or None where a CA-mapped file did not keep them."""
    return atom_coords_many(path, domain, temperature, [(replica, frame)])[0]


def atom_coords_many(path: str, domain: str, temperature: int, pairs) -> list:
    """`atom_coords` of each (replica, frame) in `pairs`, reading the file once."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        g = f[domain][str(temperature)]
        for replica, frame in pairs:
            run = g[str(replica)]
            if "coords" in run:
                out.append(run["coords"][frame])
                continue
            where = np.flatnonzero(run["atomFrames"][()] == frame) if "atomFrames" in run else []
            out.append(run["atomCoords"][where[0]] if len(where) else None)
    return out


def read_cg(path: str, on_nan: str = "error", temperatures=None, replicas=None, force_maps=None):
    """Yield a CGTrajectory per (domain, temperature, replica) of an mdCATH file.

    on_nan: "error" raises MdcathError naming file, domain, temperature, replica and frame;
    "skip" drops such frames and lists them in `skipped_frames`. force_maps: {domain: W [R, N]}
    maps the forces of those domains with W instead of the residue sums. A CA-mapped file
    (`is_mapped`) yields its stored bead forces, and refuses `force_maps`."""
    if is_mapped(path):
        if force_maps:
            raise MdcathError(f"{path}: a CA-mapped file keeps the bead forces of its own force map; "
                              "it cannot be mapped again (use data.force_map=stored)")  # fmt: skip
        yield from read_mapped(path, on_nan, temperatures, replicas)
        return
    for run in read_runs(path, on_nan, temperatures, replicas):
        w = (force_maps or {}).get(run.domain)
        pos, cg_forces = coarse_grain(run.topology, run.coords, run.forces, w)
        yield CGTrajectory(run.domain, run.temperature, run.replica, run.topology.species, pos, cg_forces,
                           run.skipped_frames)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class AtomRun:
    """One (domain, temperature, replica) of all-atom frames, NaN frames already dropped."""

    domain: str
    temperature: int
    replica: int
    label: str  # "file: domain d, temperature T K, replica r", for messages
    topology: Topology
    pdb_text: str
    coords: np.ndarray  # [F, N, 3] Å
    forces: np.ndarray  # [F, N, 3] kcal/mol/Å
    skipped_frames: tuple = ()


def read_runs(path: str, on_nan: str = "error", temperatures=None, replicas=None):
    """Yield an AtomRun per (domain, temperature, replica) of an mdCATH file, checked as `read_cg` says."""
    import h5py

    if on_nan not in ("error", "skip"):
        raise ValueError(f"on_nan must be 'error' or 'skip', got {on_nan!r}")
    name = os.path.basename(path)
    if is_mapped(path):
        raise MdcathError(f"{path}: a CA-mapped file ({MAPPED_LAYOUT}) has no all-atom frames to map; read it "
                          "with data.force_map=stored")  # fmt: skip
    with h5py.File(path, "r") as f:
        for dom, temp, rep, label, g, run in _groups(f, name, temperatures, replicas):
            pdb_text = _text(g["pdbProteinAtoms"])
            top = parse_topology(pdb_text, dom, where=label + ": ")
            for key in ("coords", "forces"):
                if key not in run:
                    raise MdcathError(f"{label}: no {key} dataset")
            coords, forces = run["coords"][()], run["forces"][()]
            n_atoms = len(top.atom_residue)
            if coords.shape[1:] != (n_atoms, 3) or forces.shape != coords.shape:
                raise MdcathError(
                    f"{label}: coords {coords.shape} and forces {forces.shape} do not match the "
                    f"{n_atoms} atoms of pdbProteinAtoms"
                )
            ok = _finite(label, on_nan, coords, forces)
            yield AtomRun(dom, temp, rep, label, top, pdb_text, coords[ok], forces[ok],
                          tuple(np.flatnonzero(~ok).tolist()))  # fmt: skip


def write_domain(path: str, domain: str, pdb_text: str, atoms: dict, extra_text: dict | None = None):
    """Create an mdCATH file holding the domain's topology (no simulations yet); atomic."""
    import h5py

    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["layout"] = LAYOUT
        g = f.create_group(domain)
        g.attrs["numProteinAtoms"] = len(atoms["element"])
        g.attrs["numResidues"] = len(np.unique(np.stack([atoms["chain"], atoms["resid"].astype(str)]), axis=1).T)
        g.attrs["numChains"] = len(np.unique(atoms["chain"]))
        for key in ("chain", "element", "resname"):
            g.create_dataset(key, data=np.asarray(atoms[key], dtype="S"))
        g.create_dataset("resid", data=np.asarray(atoms["resid"], np.int64))
        g.create_dataset("z", data=np.asarray(atoms["z"], np.int64))
        g.create_dataset("pdbProteinAtoms", data=np.bytes_(pdb_text))
        for key, text in (extra_text or {}).items():
            g.create_dataset(key, data=np.bytes_(text))
    os.replace(tmp, path)


def write_replica(path: str, domain: str, temperature: int, replica: int, coords, forces, box_nm, extra=None):
    """Add /<domain>/<temperature>/<replica> to an existing file, atomically.

    The file is copied, extended and renamed over the original, so a run killed while writing
    leaves the previous complete file in place."""
    import h5py

    tmp = path + ".tmp"
    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "a") as f:
        g = f[domain].require_group(str(int(temperature)))
        if str(int(replica)) in g:
            del g[str(int(replica))]
        run = g.create_group(str(int(replica)))
        run.attrs["numFrames"] = len(coords)
        run.create_dataset("coords", data=np.asarray(coords, np.float32)).attrs["unit"] = "Angstrom"
        run.create_dataset("forces", data=np.asarray(forces, np.float32)).attrs["unit"] = "kcal/mol/Angstrom"
        run.create_dataset("box", data=np.asarray(box_nm, np.float32)).attrs["unit"] = "nm"
        for key, value in (extra or {}).items():
            run.create_dataset(key, data=np.asarray(value))
    os.replace(tmp, path)
