"""CA-mapped mdCATH files: the CG data of a simulation, small enough to commit.

An all-atom mdCATH file holds ~4 kB per frame for a 166-atom protein; its CG data (CA positions
and bead forces of one bead per residue) ~0.2 kB. `convert` keeps the CG data and enough of the
rest to use it without the all-atom file:

    attrs: layout = "molgen-cg-mapped-v1", provenance (JSON: source file and its sha256, the
           command's arguments, the force-map report)
    /<dom>                      pdbProteinAtoms (text), forceMap W [R, N] (the map of beadForces)
        /<temp K>/<replica>/    caCoords (F, R, 3) Å, beadForces (F, R, 3) kcal/mol/Å,
                                atomFrames (K,) and atomCoords (K, N, 3) Å: every `atom_every`-th
                                frame's all-atom coordinates (starting points of the fixed-CA
                                noise-floor estimate, `molgen.cg.evaluation.noise_floor`)

The force map is the optimised map (`molgen.cg.forcemap`) fitted on the runs at
`fit_temperatures` only (for chignolin: the high-temperature unfolding run), so no frame that
trains or tests a model chose its own label; the report gives each temperature's mean squared
bead force under the residue sums and under the map. Read it with `data.force_map=stored`.

    python -m molgen.cg.mapped --src=runs/cln025_ref/mdcath_dataset_cln025.h5 \\
        --out=third_party/data/cg/cln025/cln025_ca.h5 --fit_temperatures=450 --frame_ps=1
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
from absl import flags

from molgen.cg import forcemap, mdcath
from molgen.core import cli

log = logging.getLogger("molgen.cg.mapped")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(src: str, out: str, fit_temperatures=(450,), window: int = 1, atom_every: int = 25,
            temperatures=None, frame_ps: float = 0.0) -> dict:  # fmt: skip
    """Write the CA-mapped file `out` of the all-atom mdCATH file `src` (atomically); return its report."""
    import h5py

    runs = list(mdcath.read_runs(src, temperatures=temperatures))
    if not runs:
        raise mdcath.MdcathError(f"{src}: no runs at temperatures {temperatures}")
    fit = [r for r in runs if r.temperature in set(int(t) for t in fit_temperatures)]
    if not fit:
        raise mdcath.MdcathError(f"{src}: no runs at fit_temperatures {list(fit_temperatures)} to fit the force map")
    report = {"source": os.path.basename(src), "source_sha256": sha256(src), "fit_temperatures": list(fit_temperatures),
              "window": window, "atom_every": atom_every, "frame_ps": frame_ps, "domains": {}}  # fmt: skip
    maps = {}
    for dom in sorted({r.domain for r in runs}):
        mine = [r for r in fit if r.domain == dom]
        if not mine:
            raise mdcath.MdcathError(f"{src}: domain {dom} has no run at fit_temperatures {list(fit_temperatures)}")
        top = mine[0].topology
        groups = forcemap.constraint_groups(mdcath.atom_elements(mine[0].pdb_text), mine[0].coords[0], f"{dom}: ")
        w = forcemap.fit(top, groups, np.concatenate([r.forces for r in mine]), window=window)
        forcemap.check(w, top, groups, f"domain {dom}: ")
        maps[dom] = w
        per_t = {}
        for r in (r for r in runs if r.domain == dom):
            t = per_t.setdefault(str(r.temperature), {"frames": 0, "ns_sum": 0.0, "ns_opt": 0.0})
            t["frames"] += len(r.forces)
            t["ns_sum"] += forcemap.mean_square(forcemap.residue_sum(top), r.forces) * len(r.forces)
            t["ns_opt"] += forcemap.mean_square(w, r.forces) * len(r.forces)
        report["domains"][dom] = {
            t: {
                "frames": v["frames"],
                "mean_square_residue_sum": v["ns_sum"] / v["frames"],
                "mean_square_optimized": v["ns_opt"] / v["frames"],
            }  # fmt: skip
            for t, v in per_t.items()
        }
    tmp = out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs["layout"] = mdcath.MAPPED_LAYOUT
        f.attrs["provenance"] = json.dumps(report)
        for r in runs:
            g = f.require_group(r.domain)
            if "pdbProteinAtoms" not in g:
                g.create_dataset("pdbProteinAtoms", data=np.bytes_(r.pdb_text))
                g.create_dataset("forceMap", data=maps[r.domain].astype(np.float32))
            pos, frc = mdcath.coarse_grain(r.topology, r.coords, r.forces, maps[r.domain])
            run = g.require_group(str(r.temperature)).create_group(str(r.replica))
            keep = np.arange(0, len(pos), atom_every)
            run.create_dataset("caCoords", data=pos, compression="gzip").attrs["unit"] = "Angstrom"
            run.create_dataset("beadForces", data=frc, compression="gzip").attrs["unit"] = "kcal/mol/Angstrom"
            run.create_dataset("atomFrames", data=keep)
            run.create_dataset("atomCoords", data=r.coords[keep].astype(np.float32), compression="gzip")
    os.replace(tmp, out)
    report["sha256"] = sha256(out)
    report["bytes"] = os.path.getsize(out)
    return report


def _flags(fv):
    flags.DEFINE_string("src", None, "all-atom mdCATH-format HDF5 file", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "CA-mapped HDF5 file to write", required=True, flag_values=fv)
    flags.DEFINE_list("fit_temperatures", ["450"], "temperatures (K) whose runs fit the force map", flag_values=fv)
    flags.DEFINE_list("temperatures", [], "temperatures (K) to keep (empty: all)", flag_values=fv)
    flags.DEFINE_integer("window", 1, "residues either side a bead's map may use", flag_values=fv)
    flags.DEFINE_integer("atom_every", 25, "keep every n-th frame's all-atom coordinates", flag_values=fv)
    flags.DEFINE_float("frame_ps", 0.0, "ps between frames, recorded in the provenance (0: unknown)", flag_values=fv)
    return fv


def _cli(a, argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    rep = convert(a.src, a.out, [int(t) for t in a.fit_temperatures], a.window, a.atom_every,
                  [int(t) for t in a.temperatures] or None, a.frame_ps)  # fmt: skip
    print(json.dumps(rep, indent=1))


def main(argv=None):
    """The CLI in this process: main(["--src=a.h5", "--out=b.h5"]); None: from the shell."""
    cli.run("molgen.cg.mapped", _flags, _cli, argv)


if __name__ == "__main__":
    main()
