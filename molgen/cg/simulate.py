"""Make mdCATH-format data here: implicit-solvent OpenMM MD of a small protein.

amber14 + GBn2 implicit solvent, HBond constraints, hydrogen mass repartitioning (hydrogens 3 amu,
so 4 fs steps are stable; the potential and hence the recorded forces are unchanged), Langevin
(middle) integrator, CPU platform by default (`--platform=CUDA|OpenCL|auto`). About 35 steps/s
for HP36 on 2 cores.
Every frame records positions (Å) and forces (kcal/mol/Å) of all protein atoms, hydrogens
included, in the order of the stored `pdbProteinAtoms` text, as mdCATH does. `getForces()`
leaves out constraint forces; they act within a residue, so per-residue sums are unaffected.

Resumable: each (temperature, replica) run keeps its frames so far and the OpenMM state in
`<file>.progress/<T>_<r>.npz` (written atomically after every chunk). A finished run is moved
into the HDF5 file (atomically) and its progress file removed, so a killed producer started
again with the same arguments continues where it stopped.

    python -m molgen.cg.simulate --out=data/cg/mdcath_dataset_villin.h5 --temperatures=320,348 \\
        --replicas=2 --frames=200 --steps_per_frame=50
"""

from __future__ import annotations

import io
import logging
import os
import time
import zlib

import numpy as np
from absl import flags

from molgen.cg import mdcath
from molgen.core import cli

KJ_PER_KCAL = 4.184
log = logging.getLogger("molgen.cg.simulate")


def villin_pdb() -> str:
    """Villin headpiece HP36 (PDB 1VII), shipped with pdbfixer's tests."""
    import pdbfixer

    return os.path.join(os.path.dirname(pdbfixer.__file__), "tests", "data", "test.pdb")


def prepare(pdb_path: str):
    """PDBFixer: standard residues, no heterogens or water, missing atoms and hydrogens at pH 7."""
    import pdbfixer

    fixer = pdbfixer.PDBFixer(filename=pdb_path)
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # do not model missing termini/loops
    fixer.findNonstandardResidues()
    fixer.replaceNonstandardResidues()
    fixer.removeHeterogens(keepWater=False)
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    return fixer.topology, fixer.positions


def _system(topology):
    import openmm.app as app
    import openmm.unit as u

    ff = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    return ff.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds, hydrogenMass=3 * u.amu)


PLATFORMS = ("auto", "CPU", "CUDA", "OpenCL")


def platform(name: str = "CPU", threads: int | None = None):
    """(OpenMM platform, its properties): "CPU" with `threads` threads (default every core),
    "CUDA" or "OpenCL" in mixed precision, or "auto": the first of CUDA, OpenCL, CPU present."""
    import openmm

    if name not in PLATFORMS:
        raise ValueError(f"OpenMM platform must be one of {PLATFORMS}, got {name!r}")
    have = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name == "auto":
        name = next(p for p in ("CUDA", "OpenCL", "CPU") if p in have)
    if name not in have:
        raise ValueError(f"OpenMM platform {name!r} is not available here (have {have})")
    if name == "CPU":
        return openmm.Platform.getPlatformByName(name), {"Threads": str(threads or os.cpu_count() or 1)}
    return openmm.Platform.getPlatformByName(name), {"Precision": "mixed"}


def _context(system, temperature, dt_fs, friction_ps, seed, threads, platform_name: str = "CPU"):
    import openmm
    import openmm.unit as u

    integrator = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin, friction_ps / u.picosecond, dt_fs * u.femtoseconds
    )
    integrator.setRandomNumberSeed(seed)
    plat, props = platform(platform_name, threads)
    return openmm.Context(system, integrator, plat, props), integrator


def _atoms(topology):
    atoms = list(topology.atoms())
    return {
        "chain": [a.residue.chain.id or "A" for a in atoms],
        "element": [a.element.symbol for a in atoms],
        "resid": np.asarray([int(a.residue.id) for a in atoms]),
        "resname": [a.residue.name for a in atoms],
        "z": np.asarray([a.element.atomic_number for a in atoms]),
    }


def _save_progress(path, coords, forces, state_xml):
    tmp = path + ".tmp.npz"
    np.savez(tmp, coords=np.asarray(coords, np.float32), forces=np.asarray(forces, np.float32), state=state_xml)
    os.replace(tmp, path)


def produce(
    out: str,
    pdb_path: str | None = None,
    domain: str = "villin",
    temperatures=(320, 348),
    replicas: int = 2,
    frames: int = 200,
    steps_per_frame: int = 50,
    equilibration_steps: int = 500,
    dt_fs: float = 4.0,
    friction_ps: float = 1.0,
    seed: int = 0,
    chunk: int = 20,
    threads: int | None = None,
    platform_name: str = "CPU",
    unfolded_from: int = 0,
    unfolded_frames: int = 0,
) -> str:
    """Simulate every (temperature, replica) not yet in `out`; return `out`. `platform_name`:
    see `platform` (the CPU default keeps runs reproducible across machines).

    Starting structures: the minimised input structure, except with `unfolded_from` = T_hot
    (one of `temperatures`, listed before the others): the T_hot run has max(1, replicas // 2)
    replicas of `unfolded_frames` frames (default `frames`), and at every other temperature the
    odd replicas r start from the last frame of T_hot replica (r // 2) mod that number, so a
    landscape is sampled from both the folded and the unfolded side."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    threads = threads or os.cpu_count() or 1
    pdb_path = pdb_path or villin_pdb()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not os.path.exists(out):
        topology, positions = prepare(pdb_path)
        system = _system(topology)
        ctx, _ = _context(system, 300.0, dt_fs, friction_ps, seed, threads, platform_name)
        ctx.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 2000)
        positions = ctx.getState(getPositions=True).getPositions()
        buf = io.StringIO()
        app.PDBFile.writeFile(topology, positions, buf, keepIds=True)
        mdcath.write_domain(out, domain, buf.getvalue(), _atoms(topology), {"pdb": open(pdb_path).read()})
        log.info("wrote topology of %s (%d atoms) to %s", domain, topology.getNumAtoms(), out)
    pdb = app.PDBFile(io.StringIO(_stored_pdb(out, domain)))
    topology, start = pdb.topology, pdb.positions
    system = _system(topology)
    progress_dir = out + ".progress"
    os.makedirs(progress_dir, exist_ok=True)
    done = _done_runs(out, domain)
    temperatures = [int(t) for t in temperatures]
    if unfolded_from and (not temperatures or temperatures[0] != unfolded_from):
        raise ValueError(f"unfolded_from={unfolded_from} K must be the first of temperatures {list(temperatures)}")
    for temp in temperatures:
        hot = bool(unfolded_from) and temp == unfolded_from
        # the hot run has one replica per odd replica of the others, each `unfolded_frames` long
        n_frames = (unfolded_frames or frames) if hot else frames
        for rep in range(max(1, replicas // 2) if hot else replicas):
            if (int(temp), rep) in done:
                continue
            run_seed = zlib.crc32(f"{seed}/{domain}/{temp}/{rep}".encode()) & 0x7FFFFFFF
            ctx, integrator = _context(system, float(temp), dt_fs, friction_ps, run_seed, threads, platform_name)
            progress = os.path.join(progress_dir, f"{temp}_{rep}.npz")
            if os.path.exists(progress):
                saved = np.load(progress)
                coords, forces = list(saved["coords"]), list(saved["forces"])
                ctx.setState(openmm.XmlSerializer.deserialize(str(saved["state"])))
                log.info("%s %d K replica %d: resuming at frame %d", domain, temp, rep, len(coords))
            else:
                coords, forces = [], []
                if unfolded_from and not hot and rep % 2:
                    src = (rep // 2) % max(1, replicas // 2)
                    run = next(mdcath.read_runs(out, temperatures=(unfolded_from,), replicas=(src,)))
                    ctx.setPositions(run.coords[-1] * u.angstrom)
                    log.info("%s %d K replica %d starts from the end of %d K replica %d", domain, temp, rep,
                             unfolded_from, src)  # fmt: skip
                else:
                    ctx.setPositions(start)
                ctx.setVelocitiesToTemperature(float(temp) * u.kelvin, run_seed)
                integrator.step(equilibration_steps)
            t0 = time.time()
            while len(coords) < n_frames:
                for _ in range(min(chunk, n_frames - len(coords))):
                    integrator.step(steps_per_frame)
                    st = ctx.getState(getPositions=True, getForces=True)
                    coords.append(st.getPositions(asNumpy=True).value_in_unit(u.angstrom))
                    forces.append(
                        st.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.angstrom) / KJ_PER_KCAL
                    )
                state = ctx.getState(
                    getPositions=True, getVelocities=True, getParameters=True, enforcePeriodicBox=False
                )
                _save_progress(progress, coords, forces, openmm.XmlSerializer.serialize(state))
            ps = n_frames * steps_per_frame * dt_fs / 1000.0
            box = np.eye(3) * 0.0  # no periodic box (implicit solvent); mdCATH stores one in nm
            mdcath.write_replica(out, domain, temp, rep, np.stack(coords), np.stack(forces), box)
            os.remove(progress)
            log.info(
                "%s %d K replica %d: %d frames (%.1f ps) in %.0f s", domain, temp, rep, n_frames, ps, time.time() - t0
            )
    return out


def fixed_ca_system(pdb_text: str, domain: str):
    """(OpenMM system, topology) of the protein with its CA atoms held fixed (mass 0). CA-H bonds
    are flexible (constraints cannot touch a fixed atom), so runs need a 1 fs step."""
    import openmm.app as app
    import openmm.unit as u

    pdb, top = app.PDBFile(io.StringIO(pdb_text)), mdcath.parse_topology(pdb_text, domain)
    ff = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds,
                             hydrogenMass=3 * u.amu, flexibleConstraints=True)  # fmt: skip
    ca = set(int(i) for i in top.ca_index)
    for i in reversed(range(system.getNumConstraints())):
        a, b, _ = system.getConstraintParameters(i)
        if a in ca or b in ca:
            system.removeConstraint(i)
    for i in ca:
        system.setParticleMass(i, 0.0)
    return system, top


def fixed_ca_samples(system, top, coords, temperature, samples, steps_per_sample=10, equilibration_steps=200,
                     dt_fs=1.0, seed=0, threads=None, minimize: int = 0):  # fmt: skip
    """Langevin MD of `fixed_ca_system` from all-atom `coords` [N, 3] (Å) at `temperature`:
    (coords, forces) of `samples` frames, [S, N, 3] in Å and kcal/mol/Å, every `steps_per_sample`
    steps after `equilibration_steps`, first relaxing the other atoms by up to `minimize` energy
    minimisation iterations (OpenMM's minimiser leaves massless atoms in place). The CAs stay
    exactly at their starting positions (checked)."""
    import openmm
    import openmm.unit as u

    threads = threads or os.cpu_count() or 1
    start = np.asarray(coords, np.float64) / 10.0  # nm
    ctx, integrator = _context(system, float(temperature), dt_fs, 1.0, seed, threads)
    ctx.setPositions(start * u.nanometer)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, minimize)
    ctx.setVelocitiesToTemperature(float(temperature) * u.kelvin, seed)
    integrator.step(equilibration_steps)
    xs, fs = [], []
    for _ in range(samples):
        integrator.step(steps_per_sample)
        st = ctx.getState(getPositions=True, getForces=True)
        xs.append(st.getPositions(asNumpy=True).value_in_unit(u.angstrom))
        fs.append(st.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.angstrom) / KJ_PER_KCAL)
    ca = np.asarray(top.ca_index)
    drift = np.abs(xs[-1][ca] - start[ca] * 10.0).max()
    if drift > 1e-5:
        raise RuntimeError(f"CA atoms moved by {drift} Å in the fixed-CA run")
    return np.stack(xs).astype(np.float32), np.stack(fs).astype(np.float32)


def backmap(pdb_text: str, domain: str, pool, target, stiffness=(1e2, 1e5), stages: int = 10, steps: int = 100,
            iterations: int = 200, seed: int = 0, threads=None) -> dict:  # fmt: skip
    """All-atom coordinates (Å) whose CA atoms sit at the CG configuration `target` [R, 3] (Å).

    The frame of `pool` [P, N, 3] (all-atom frames, Å) whose CAs are closest to `target` (Kabsch
    RMSD) is superposed onto it, then its CAs are pulled onto `target` by harmonic restraints of
    growing stiffness (kJ/mol/nm²) with amber14 in vacuum (the solvent model costs most, and the
    fixed-CA run that follows equilibrates in it) and finally set exactly there. Returns coords,
    the pool frame used, its CA RMSD to the target before pulling, and the CA deviation left by the last restraint (Å).

    Pulling is steered MD: `stages` restraint stiffnesses from stiffness[0] to stiffness[1]
    (geometric), `steps` of 2 fs Langevin MD at 300 K each, then `iterations` of minimisation."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    from molgen.cg import analysis

    threads = threads or os.cpu_count() or 1
    top = mdcath.parse_topology(pdb_text, domain)
    ca = np.asarray(top.ca_index)
    target = np.asarray(target, np.float64)
    pool = np.asarray(pool, np.float64)
    rmsd = analysis.kabsch_rmsd(pool[:, ca], target)
    pick = int(np.argmin(rmsd))
    x = pool[pick]
    # superpose the frame onto the target by its CAs (rotation about the CA centroids)
    a, b = x[ca] - x[ca].mean(0), target - target.mean(0)
    uu, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(uu @ vt))
    rot = uu @ np.diag([1.0, 1.0, d]) @ vt
    x = (x - x[ca].mean(0)) @ rot + target.mean(0)
    pdb = app.PDBFile(io.StringIO(pdb_text))
    ff = app.ForceField("amber14-all.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    pull = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    pull.addGlobalParameter("k", 0.0)
    for name in ("x0", "y0", "z0"):
        pull.addPerParticleParameter(name)
    for i, r in zip(ca, target / 10.0, strict=True):
        pull.addParticle(int(i), [float(v) for v in r])
    system.addForce(pull)
    ctx, integrator = _context(system, 300.0, 2.0, 10.0, seed, threads)
    ctx.setPositions(x / 10.0 * u.nanometer)
    ctx.setParameter("k", float(stiffness[0]))
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, iterations)
    ctx.setVelocitiesToTemperature(300.0 * u.kelvin, seed)
    for k in np.geomspace(stiffness[0], stiffness[1], stages):
        ctx.setParameter("k", float(k))
        integrator.step(steps)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, iterations)
    out = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(u.angstrom)
    left = float(np.abs(out[ca] - target).max())
    out[ca] = target
    return {"coords": out, "pool_frame": pick, "pool_ca_rmsd": float(rmsd[pick]), "restraint_deviation": left}


def conditional_force_noise(path: str, domain: str, temperature: int, frames, samples: int = 100,
                            steps_per_sample: int = 10, equilibration_steps: int = 200, dt_fs: float = 1.0,
                            seed: int = 0, threads: int | None = None, weights=None) -> dict:  # fmt: skip
    """The irreducible force-matching error of the CA mapping, E_x[Var(F_CG | x)], per component.

    `weights` [R, N]: a force map (molgen.cg.forcemap) to measure besides the residue sums; then
    `noise_mse` is its noise, `noise_mse_sum` the residue sums' on the same samples, and
    `mean_force_rms_diff` the RMS difference of the two maps' sample-mean forces per
    configuration (valid maps share the mean force; compare with `mean_force_rms`).

    At each given CG configuration x (CA positions of an all-atom frame `frames` = [(replica,
    frame index)]), the CA atoms are held fixed (mass 0) and the rest of the protein is sampled
    by Langevin MD at `temperature`; the variance of the mapped (residue-summed) force over
    those samples is the noise no CG force field can fit. CA-HA is kept as a flexible bond
    (constraints cannot touch a fixed atom), hence the 1 fs step."""
    text = _stored_pdb(path, domain)
    system, top = fixed_ca_system(text, domain)
    per_config, per_sum, mean_diff, mean_rms = [], [], [], []
    for k, (rep, frame) in enumerate(frames):
        coords = mdcath.atom_coords(path, domain, temperature, rep, frame)
        if coords is None:
            raise mdcath.MdcathError(f"{path}: domain {domain}, {temperature} K, replica {rep}: frame {frame} "
                                     "has no all-atom coordinates (a CA-mapped file keeps only some)")  # fmt: skip
        _, forces = fixed_ca_samples(system, top, coords, temperature, samples, steps_per_sample,
                                     equilibration_steps, dt_fs, seed + k, threads)  # fmt: skip
        zeros = np.zeros_like(forces)
        _, cg = mdcath.coarse_grain(top, zeros, forces)
        per_sum.append(float(np.mean(np.var(cg, axis=0, ddof=1))))
        if weights is not None:
            _, cgw = mdcath.coarse_grain(top, zeros, forces, weights)
            per_config.append(float(np.mean(np.var(cgw, axis=0, ddof=1))))
            mean_diff.append(float(np.sqrt(np.mean((cgw.mean(0) - cg.mean(0)) ** 2))))
            mean_rms.append(float(np.sqrt(np.mean(cg.mean(0) ** 2))))
    out = {"noise_mse": float(np.mean(per_config or per_sum)), "per_config": per_config or per_sum,
           "frames": [list(x) for x in frames], "temperature": temperature, "samples": samples,
           "sample_interval_fs": steps_per_sample * dt_fs}  # fmt: skip
    if weights is not None:
        out.update(noise_mse_sum=float(np.mean(per_sum)), per_config_sum=per_sum,
                   mean_force_rms_diff=float(np.mean(mean_diff)), mean_force_rms=float(np.mean(mean_rms)))  # fmt: skip
    return out


def _stored_pdb(path, domain):
    import h5py

    with h5py.File(path, "r") as f:
        return mdcath._text(f[domain]["pdbProteinAtoms"])


def _done_runs(path, domain):
    import h5py

    with h5py.File(path, "r") as f:
        g = f[domain]
        return {(int(t), int(r)) for t in g.keys() if t.isdigit() for r in g[t].keys()}


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: other modules share names such as --out)."""
    flags.DEFINE_string("out", None, "mdCATH-format HDF5 file to write (or resume)", required=True, flag_values=fv)
    if "pdb" in fv:  # absl.app's alias of --pdb_post_mortem; here --pdb is the input structure
        delattr(fv, "pdb")
    flags.DEFINE_string("pdb", None, "input PDB (default: villin HP36 from pdbfixer)", flag_values=fv)
    flags.DEFINE_string("domain", "villin", "domain name in the file", flag_values=fv)
    flags.DEFINE_list("temperatures", ["320", "348"], "temperatures (K)", flag_values=fv)
    flags.register_validator("temperatures", lambda v: all(t.isdigit() for t in v), "needs whole K", flag_values=fv)
    flags.DEFINE_integer("replicas", 2, "runs per temperature", flag_values=fv)
    flags.DEFINE_integer("frames", 200, "frames per run", flag_values=fv)
    flags.DEFINE_integer("steps_per_frame", 50, "4 fs steps between frames", flag_values=fv)
    flags.DEFINE_integer("equilibration_steps", 500, "steps before the first frame", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    flags.DEFINE_enum("platform", "CPU", PLATFORMS, "OpenMM platform (auto: CUDA, OpenCL, CPU)", flag_values=fv)
    flags.DEFINE_integer("threads", 0, "CPU platform threads (0: every core)", flag_values=fv)
    flags.DEFINE_integer("unfolded_from", 0, "hot temperature (K, listed first) whose last frames start the odd "
                         "replicas of the other temperatures; 0: all start folded", flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("unfolded_frames", 0, "frames per hot replica (0: --frames)", flag_values=fv)
    return fv


def _cli(a, argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # absl set one up
    temps = [int(t) for t in a.temperatures]
    produce(a.out, a.pdb, a.domain, temps, a.replicas, a.frames, a.steps_per_frame, a.equilibration_steps,
            seed=a.seed, threads=a.threads or None, platform_name=a.platform,
            unfolded_from=a.unfolded_from, unfolded_frames=a.unfolded_frames)  # fmt: skip


def main(argv=None):
    """The CLI in this process: main(["--out=x.h5", "--frames=10"]); None: from the shell."""
    cli.run("molgen.cg.simulate", _flags, _cli, argv)


if __name__ == "__main__":
    main()
