"""LAMMPS throughput of an exported CG model: the standalone `launch/lammps/run_exported.py` (no
molgen) against `molgen.cg.lammps` on the same artifact, in one script.

    python benchmarks/cg_lammps_exported.py runs/cg_villin/export [--copies=1,8] [--steps=2000] [--dt=2]

For each copy count, both run the same NVE simulation (folded structure, copies 60 Å apart,
velocities at 300 K, seed 0), each in its own process as a user would start it. Prints steps/s
(timed window after set-up and the first compilation), the ratio standalone / molgen, and the
NVE drift of each (slope of the total energy, kcal/mol/ns per bead), with their JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

MOLGEN = """
import json, sys
from molgen.cg import lammps
a = json.loads(sys.argv[1])
out = lammps.run(a["artifact"], a["out"], ensemble="nve", temperature=300.0, dt=a["dt"], steps=a["steps"],
                 copies=a["copies"], thermo_every=a["thermo"], chunk=a["steps"], dump_every=a["steps"], seed=0)
print(json.dumps({k: v for k, v in out.items()}))
"""


def drift(thermo: list, beads: int) -> float:
    t = np.asarray([r["time"] for r in thermo]) * 1e-6  # fs -> ns
    e = np.asarray([r["etotal"] for r in thermo])
    return float(np.polyfit(t, e, 1)[0] / beads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--copies", default="1,8")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--dt", type=float, default=2.0)
    ap.add_argument("--thermo", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    a.artifact = str(pathlib.Path(a.artifact).resolve())
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in (int(x) for x in a.copies.split(",")):
            out_s, out_m = pathlib.Path(tmp, f"standalone_{c}"), pathlib.Path(tmp, f"molgen_{c}")
            subprocess.run([sys.executable, str(ROOT / "launch/lammps/run_exported.py"), a.artifact, f"--copies={c}",
                            "--ensemble=nve", "--temperature=300", f"--dt={a.dt}", f"--steps={a.steps}",
                            f"--thermo={a.thermo}", f"--dump={a.steps}", f"--out={out_s}"],
                           check=True, env=env, cwd=tmp)  # fmt: skip
            s = json.loads((out_s / "run.json").read_text())
            args = dict(artifact=a.artifact, out=str(out_m), dt=a.dt, steps=a.steps, copies=c, thermo=a.thermo)
            res = subprocess.run([sys.executable, "-c", MOLGEN, json.dumps(args)], check=True, env=env, cwd=ROOT,
                                 capture_output=True, text=True)  # fmt: skip
            m = json.loads(res.stdout.strip().splitlines()[-1])
            row = {"copies": c, "beads": s["beads"], "steps": a.steps, "dt_fs": a.dt,
                   "standalone_steps_per_s": s["steps_per_s"], "molgen_steps_per_s": m["steps_per_s"],
                   "ratio": s["steps_per_s"] / m["steps_per_s"],
                   "standalone_drift": s["drift_kcal_mol_ns_bead"], "molgen_drift": drift(m["thermo"], m["beads"]),
                   "standalone_compilations": s["compilations"]}  # fmt: skip
            rows.append(row)
            print(f"copies {c} ({row['beads']} beads): standalone {row['standalone_steps_per_s']:.1f} steps/s, "
                  f"molgen.cg.lammps {row['molgen_steps_per_s']:.1f} steps/s, ratio {row['ratio']:.2f}; NVE drift "
                  f"{row['standalone_drift']:+.4f} / {row['molgen_drift']:+.4f} kcal/mol/ns/bead",
                  flush=True)  # fmt: skip
    print(json.dumps(rows))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
