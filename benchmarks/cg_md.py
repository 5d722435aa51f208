"""CG MD throughput: LAMMPS + the jax.export artifact, the jitted jax-md loop, and a plain
Python loop over the jitted force function, for 1, 8 and 64 copies of the protein.

    python benchmarks/cg_md.py [--workdir=runs/cg_villin] [--steps=200] [--copies=1,8,64]

The model is the trained one in --workdir (experiments/cg_villin.py); it is exported into a
temporary folder. All three integrate NVE at 2 fs from the folded structure with 300 K
velocities (copies 60 Å apart on a grid, one system). Each prints steps/s and ns/day after its
compilation; the ratios are against the Python loop in the same run, and for LAMMPS the share
of its wall time spent in the fix-external callback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from molgen.cg import export, lammps, md  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/cg_villin")
    ap.add_argument("--steps", type=int, default=200, help="timed steps for one copy (fewer for more copies)")
    ap.add_argument("--copies", default="1,8,64")
    ap.add_argument("--dt", type=float, default=2.0)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.workdir, "evaluation.json")):
        sys.exit(f"{args.workdir} holds no trained CG model: run experiments/cg_villin.py into it first")
    _, model, nnp, pp, _ = export.load_trained(args.workdir)
    tmp = tempfile.mkdtemp(prefix="cg_md_bench_")
    folder = export.write(args.workdir, os.path.join(tmp, "export"))
    _, meta = export.load(folder)
    rows = []
    print(f"{'copies':>6} {'beads':>6} | {'LAMMPS+export':>14} {'jax-md loop':>12} {'Python loop':>12} | "
          f"{'LAMMPS/Py':>9} {'jax-md/Py':>9} {'callback share':>14}   (steps/s)")  # fmt: skip
    for copies in map(int, args.copies.split(",")):
        steps = max(20, args.steps // copies**0.5 // 10 * 10)
        system = md.make_system(meta, copies)
        run = lammps.run(folder, os.path.join(tmp, f"lammps_{copies}"), ensemble="nve", dt=args.dt, steps=int(steps),
                         chunk=int(steps), thermo_every=int(steps), dump_every=int(steps), copies=copies)  # fmt: skip
        _, _, timing = md.run(model, nnp, pp, system, ensemble="nve", dt=args.dt, steps=int(steps) + 10,
                              record_every=10)  # fmt: skip
        jaxmd = timing["timed_steps"] / timing["seconds"]
        ff = md.jitted_forces(model, nnp, pp, system)
        md.python_loop(ff, system, dt=args.dt, steps=2)  # compile
        _, seconds = md.python_loop(ff, system, dt=args.dt, steps=int(steps))
        py = steps / seconds
        row = {"copies": copies, "beads": len(system.positions), "lammps_steps_per_s": run["steps_per_s"],
               "jaxmd_steps_per_s": jaxmd, "python_steps_per_s": py, "callback_share": run["callback_share"],
               "lammps_ns_per_day": run["ns_per_day"], "jaxmd_ns_per_day": jaxmd * args.dt * 1e-6 * 86400}  # fmt: skip
        rows.append(row)
        print(f"{copies:>6} {row['beads']:>6} | {run['steps_per_s']:>14.1f} {jaxmd:>12.1f} {py:>12.1f} | "
              f"{run['steps_per_s'] / py:>8.2f}x {jaxmd / py:>8.2f}x {run['callback_share']:>13.1%}")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
