"""Ship a trained CG model: `jax.export` of energy, forces and virial with symbolic sizes.

    python -m molgen.cg.export --workdir=runs/cg_villin [--out=runs/cg_villin/export] [--members=mean]

`--members=mean` exports an ensemble's mean network energy (plus the shared priors) instead of
its best member: each call then evaluates every member.

The artifact folder holds
- `model.jax`: `Exported.serialize()` bytes (parameters are constants inside);
- `model.mlir`: the StableHLO text of the same function;
- `metadata.json`: format, species map, cutoff, units (LAMMPS `real`), box, the protein's bead
  count, species, masses and prior topology, the input and output signature, platforms, and
  the sha256 of `model.jax`.

The exported function takes (all int32 indices into the beads; n, e, b, a, d, p, q symbolic):

    positions f32[n, 3] Å, species i32[n],
    senders i32[e], receivers i32[e]   directed neighbour pairs within the cutoff, both ways;
                                       pairs with senders >= n are padding,
    bonds i32[b, 2], angles i32[a, 3], dihedrals i32[d, 4],
    repulsive i32[p, 2], excluded i32[q, 2], excluded_sep i32[q]   the prior topology

and returns (energy f32[] kcal/mol, forces f32[n, 3] kcal/mol/Å, virial f32[3, 3] kcal/mol).
The metadata (format v2) describes all of this for a user without molgen: each protein's
topology arrays (`proteins[i].topology`) and the rule that made them (`topology_rule`), the
padding convention and a bucket size (`pairs`), and what each output means with its sign
(`outputs`). `launch/lammps/run_exported.py` runs an artifact in LAMMPS from the metadata alone.
Loading needs only jax (`load` reads v1 and v2; also copied standalone into README.md).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from molgen.core import cli

FORMAT = "molgen-cg-export-v2"
FORMATS = ("molgen-cg-export-v1", FORMAT)  # v1: no topology, padding or output descriptions in the metadata
BUCKET = 256  # recommended padding multiple for the neighbour pairs (one compilation per bucket)
TOPOLOGY_KEYS = ("bonds", "angles", "dihedrals", "repulsive", "excluded", "excluded_sep")
_TOPO_FROM_PRIORS = {"bonds": "bond", "angles": "angle", "dihedrals": "dihedral", "repulsive": "repulsive",
                     "excluded": "excluded", "excluded_sep": "excluded_sep"}  # fmt: skip


class ExportError(ValueError):
    """An artifact that cannot be used here; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- trained model


def load_trained(workdir: str, members: str = "best"):
    """(config, Model without neighbour list, nn_params, prior_params, info) of a finished CG
    training run, with the parameters after its last enabled stage of the best ensemble member
    (`members="best"`) or of every member stacked (`"mean"`: the model's energy is the members'
    mean network energy plus the priors, which all members share)."""
    if members not in ("best", "mean"):
        raise ValueError(f"members must be 'best' or 'mean', got {members!r}")
    import ml_collections

    from molgen.cg import energy, priors
    from molgen.core import checkpoint

    wd = pathlib.Path(workdir)
    if (wd / "relent.json").exists():  # a relent fine-tuning (molgen.cg.relent): its base model, its parameters
        if members != "best":
            raise ValueError(f"{wd}: a relent run fine-tunes one model; members must be 'best', got {members!r}")
        base = load_trained(json.loads((wd / "relent.json").read_text())["model_workdir"], "best")
        template = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), base[2])
        info = {**base[4], "relent_checkpoint": str(wd / "checkpoints")}
        return base[0], base[1], checkpoint.restore_params(str(wd), template), base[3], info
    for name in ("config.json", "ensemble.json"):
        if not (wd / name).exists():
            raise FileNotFoundError(f"{wd}: no {name}; is this a finished CG training workdir?")
    config = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
    if (wd / "model.json").exists():  # values the training resolved from its data
        config.model.inner_cutoff = json.loads((wd / "model.json").read_text())["inner_cutoff"]
    elif config.model.inner_cutoff < 0:
        raise FileNotFoundError(f"{wd}: no model.json, so model.inner_cutoff=auto cannot be resolved")
    ens = json.loads((wd / "ensemble.json").read_text())
    best = int(ens["best_seed"])
    stages = [s for s in ("stage1", "stage2") if config.stages[s].enabled]
    if not stages:
        raise ValueError(f"{wd}: no training stage was enabled, there are no network parameters")
    vmapped = config.ensemble.vmap and config.ensemble.seeds > 1
    run_dir = wd / ("ensemble" if vmapped else f"seed_{best}") / stages[-1]
    seeds = [int(m["seed"]) for m in ens["seeds"]] if members == "mean" else [best]
    mc = config.model
    net = energy.make_net(mc, float(mc.inner_cutoff))
    x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    template = jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros(4, jnp.int32), *_pairs(4))["params"])
    if vmapped:
        n = config.ensemble.seeds
        template = jax.tree.map(lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype), template)
        params = jax.tree.map(lambda p: p[np.asarray(seeds)], checkpoint.restore_params(str(run_dir), template))
    else:
        each = [checkpoint.restore_params(str(wd / f"seed_{k}" / stages[-1]), template) for k in seeds]
        params = jax.tree.map(lambda *p: np.stack(p), *each)
    if members == "best":
        params = jax.tree.map(lambda p: p[0], params)
    prior_file = wd / ("priors_lbfgs.json" if config.stages.lbfgs.enabled else "priors.json")
    prior_params = priors.load(str(prior_file))
    pc = config.priors
    model = energy.Model(net, None, None, None, {k: float(pc.weights[k]) for k in priors.TERMS},
                        bool(pc.excluded_volume), float(mc.box), len(seeds) if members == "mean" else 0)  # fmt: skip
    info = {"best_seed": best, "checkpoint": str(run_dir), "members": members, "seeds": seeds}
    return config, model, jax.device_get(params), prior_params, info


def _pairs(n):
    c, r = np.nonzero(~np.eye(n, dtype=bool))
    return jnp.asarray(c, jnp.int32), jnp.asarray(r, jnp.int32), jnp.ones(len(c), bool)


# ----------------------------------------------------------------------------- the exported function


def topology_arrays(chains) -> dict:
    """Prior topology arrays (int32) for consecutive chains of the given bead counts."""
    from molgen.cg import priors

    topo = priors.topology(int(sum(chains)), chains)
    return {k: np.asarray(topo[v], np.int32) for k, v in _TOPO_FROM_PRIORS.items()}


def energy_fn(model, nn_params, prior_params):
    """f(positions, species, senders, receivers, topology dict) -> (energy, forces, virial)."""
    from molgen.cg import priors
    from molgen.cg.energy import graph_energy

    pp = priors.as_jax(prior_params)

    def f(positions, species, senders, receivers, topo):
        n = positions.shape[0]
        valid = (senders < n) & (receivers < n) & (senders >= 0) & (receivers >= 0)
        edges = (jnp.where(valid, senders, 0), jnp.where(valid, receivers, 0), valid)
        ptopo = {v: topo[k] for k, v in _TOPO_FROM_PRIORS.items()}
        mask = jnp.ones((n,), bool)

        def e(x, strain):
            return graph_energy(model, nn_params, pp, x, species, mask, edges, ptopo, strain)[0]

        total, (gx, gs) = jax.value_and_grad(e, argnums=(0, 1))(positions, jnp.zeros((3, 3), positions.dtype))
        return total, -gx, -gs

    return f


def _specs():
    n, e, b, a, d, p, q = jax.export.symbolic_shape("n, e, b, a, d, p, q")
    i32 = jnp.int32
    topo = {
        "bonds": jax.ShapeDtypeStruct((b, 2), i32),
        "angles": jax.ShapeDtypeStruct((a, 3), i32),
        "dihedrals": jax.ShapeDtypeStruct((d, 4), i32),
        "repulsive": jax.ShapeDtypeStruct((p, 2), i32),
        "excluded": jax.ShapeDtypeStruct((q, 2), i32),
        "excluded_sep": jax.ShapeDtypeStruct((q,), i32),
    }
    return (jax.ShapeDtypeStruct((n, 3), jnp.float32), jax.ShapeDtypeStruct((n,), i32),
            jax.ShapeDtypeStruct((e,), i32), jax.ShapeDtypeStruct((e,), i32), topo)  # fmt: skip


def export(model, nn_params, prior_params, platforms=("cpu", "cuda")):
    """The `jax.export.Exported` of `energy_fn`; falls back to the platforms that lower here."""
    fn = jax.jit(energy_fn(model, nn_params, prior_params))
    try:
        return jax.export.export(fn, platforms=tuple(platforms))(*_specs())
    except Exception:  # e.g. a jaxlib without the CUDA lowering rules: export for this backend alone
        if tuple(platforms) == (jax.default_backend(),):
            raise
        return jax.export.export(fn, platforms=(jax.default_backend(),))(*_specs())


def residue_masses(resnames) -> list[float]:
    """Bead masses (amu): the residue's in-chain mass from OpenMM's amber14 templates' elements
    (heavy atoms and hydrogens; one water lost per peptide bond)."""
    from openmm import app

    ff = app.ForceField("amber14-all.xml")
    out = []
    for name in resnames:
        template = ff._templates[name if name != "HIS" else "HIE"]
        out.append(round(sum(a.element.mass._value for a in template.atoms), 3))
    return out


def write(workdir: str, out: str | None = None, platforms=("cpu", "cuda"), members: str = "best") -> pathlib.Path:
    """Export the model of a CG training workdir into `out` (default <workdir>/export): its best
    ensemble member, or with members="mean" the mean of all members (`load_trained`)."""
    config, model, nn_params, prior_params, info = load_trained(workdir, members)
    out = pathlib.Path(out or pathlib.Path(workdir) / "export")
    out.mkdir(parents=True, exist_ok=True)
    exp = export(model, nn_params, prior_params, platforms)
    blob = exp.serialize()
    meta = {
        "format": FORMAT,
        **system_metadata(config),
        "cutoff": float(config.model.cutoff),
        "box": float(config.model.box),
        "units": {"style": "real", "length": "Å", "energy": "kcal/mol", "force": "kcal/mol/Å", "mass": "amu"},
        "inputs": [
            "positions f32[n,3]",
            "species i32[n]",
            "senders i32[e]",
            "receivers i32[e]",
            "topology {" + ", ".join(TOPOLOGY_KEYS) + "}",
        ],  # fmt: skip
        "outputs": OUTPUTS,
        "topology_rule": topology_rule(),
        "pairs": {
            "convention": "senders[k] -> receivers[k]: every pair of beads closer than `cutoff` (Å), listed in "
            "both directions; entries whose sender or receiver is >= n (the bead count) are padding and "
            "are ignored, so pad both arrays with n up to a multiple of `bucket`: the function compiles "
            "once per array length, so keep the length from call to call and grow it (with ~10% headroom, in "
            "multiples of `bucket`) only when the pairs outgrow it",
            "bucket": BUCKET,
            "pad_value": "n",
        },  # fmt: skip
        "platforms": list(exp.platforms),
        "jax_version": jax.__version__,
        "workdir": str(pathlib.Path(workdir).absolute()),
        "training": info,
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    _atomic_write(out / "model.jax", bytes(blob))
    _atomic_write(out / "model.mlir", exp.mlir_module().encode())
    _atomic_write(out / "metadata.json", json.dumps(meta, indent=2).encode())
    return out


def system_metadata(config) -> dict:
    """Species map, species masses and the proteins (bead count, residues, species, masses,
    folded CA structure) of a CG training config's source data: the part of the export metadata
    that `lammps.system` and `md.make_system` read."""
    from molgen.cg import data, mdcath

    proteins = []
    for path in data.source_files(config.data.source):
        for dom in mdcath.domains(path):
            import h5py

            with h5py.File(path, "r") as f:
                pdb = mdcath._text(f[dom]["pdbProteinAtoms"])
            topo = mdcath.parse_topology(pdb, dom)
            folded = mdcath.ca_positions(pdb, topo).tolist()
            chains = [len(topo.species)]
            proteins.append({"domain": dom, "n_beads": len(topo.species), "resnames": list(topo.resnames),
                             "species": topo.species.tolist(), "masses": residue_masses(topo.resnames),
                             "chains": chains, "folded": folded,
                             "topology": {k: v.tolist() for k, v in topology_arrays(chains).items()}})  # fmt: skip
    return {
        "species": {name: i for i, name in enumerate(mdcath.AMINO_ACIDS)},
        "species_masses": dict(zip(mdcath.AMINO_ACIDS, residue_masses(mdcath.AMINO_ACIDS), strict=True)),
        "proteins": proteins,
    }


OUTPUTS = {
    "energy": "f32[] kcal/mol: the potential energy of all beads (priors + network), no kinetic part",
    "forces": "f32[n,3] kcal/mol/Å: -dE/dpositions, per bead in input order",
    "virial": "f32[3,3] kcal/mol: W = -dE/d(strain), strain acting as x -> (1 + strain) x; W = sum_i x_i f_i^T "
              "in free space (positive for repulsion), LAMMPS' sign: pass xx, yy, zz, xy, xz, yz to "
              "fix_external_set_virial_global",
}  # fmt: skip


def topology_rule() -> dict:
    """The rule behind the topology arrays, in words and numbers (for users without molgen)."""
    from molgen.cg import priors

    return {
        "indices": "0-based bead indices within a protein; for several copies add copy * n_beads to every index "
                   "(excluded_sep unchanged); chains are consecutive, in `chains` order",
        "bonds": "(i, i+1) within a chain",
        "angles": "(i, i+1, i+2) within a chain",
        "dihedrals": "(i, i+1, i+2, i+3) within a chain",
        "repulsive": f"pairs (i, j) with i < j in one chain and j - i >= {priors.MIN_REPULSIVE_SEP}",
        "excluded": f"pairs (i, j) with i < j in one chain and {priors.EXCLUDED_SEPS[0]} <= j - i <= "
                    f"{priors.EXCLUDED_SEPS[-1]}; excluded_sep = j - i",
        "across_chains": "no prior term joins beads of different chains or copies (the network still sees them)",
        "min_repulsive_separation": priors.MIN_REPULSIVE_SEP,
        "excluded_separations": list(priors.EXCLUDED_SEPS),
    }  # fmt: skip


def _atomic_write(path: pathlib.Path, payload: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


# ----------------------------------------------------------------------------- loading (jax only)


def load(folder: str, species_map: dict | None = None):
    """(callable, metadata) of an artifact folder. Checks the format, the content hash and, when
    given, that the artifact's species map equals `species_map`; raises ExportError naming the
    file otherwise. Needs only jax."""
    folder = pathlib.Path(folder)
    meta_path, blob_path = folder / "metadata.json", folder / "model.jax"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: cannot read the export metadata ({e})") from e
    if meta.get("format") not in FORMATS:
        raise ExportError(f"{meta_path}: format {meta.get('format')!r} is not one of {FORMATS}")
    if species_map is not None and dict(species_map) != meta["species"]:
        theirs = meta["species"]
        diff = sorted(k for k in set(species_map) | set(theirs) if species_map.get(k) != theirs.get(k))
        raise ExportError(f"{meta_path}: the artifact's species map differs from this system's for {diff[:6]}")
    try:
        blob = blob_path.read_bytes()
    except OSError as e:
        raise ExportError(f"{blob_path}: cannot read the serialized model ({e})") from e
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ExportError(f"{blob_path}: content hash differs from metadata.json (corrupt or replaced file)")
    try:
        exp = jax.export.deserialize(bytearray(blob))
    except Exception as e:
        raise ExportError(f"{blob_path}: does not deserialize as a jax.export artifact ({e})") from e
    return exp.call, meta


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: molgen.main defines --workdir too)."""
    flags.DEFINE_string("workdir", None, "a finished CG training workdir", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "artifact folder (default: <workdir>/export)", flag_values=fv)
    flags.DEFINE_list("platforms", ["cpu", "cuda"], "platforms to export for", flag_values=fv)
    flags.DEFINE_enum("members", "best", ["best", "mean"], "the best ensemble member, or the mean of all",
                      flag_values=fv)  # fmt: skip
    return fv


def _cli(a, argv):
    print(write(a.workdir, a.out, tuple(a.platforms), a.members))


def main(argv=None):
    """The CLI in this process: main(["--workdir=X"]); None: from the shell."""
    cli.run("molgen.cg.export", _flags, _cli, argv)


if __name__ == "__main__":
    main()
