"""CG force-field throughput: neighbour-list model against a naive all-pairs model, in one run.

    python benchmarks/cg_throughput.py [--layers=3] [--latent=32] [--channels=4] [--reps=5] [--copies=1,4,16]
        [--pdb=PATH] [--json=PATH]

Prints, for 1, 4 and 16 copies of villin HP36 (36 CA beads each, copies 60 Å apart in one
system; priors per copy):
- energy+force evaluations per second with a jax-md neighbour list (the list prebuilt, as
  between rebuilds in MD) and with the same model on all N(N-1) pairs, and the ratio;
- the neighbour-list rebuild time;
then training frames/s of the force-matching step (batch 16) on 1 and 2 fake CPU devices, the
measured speedup and Amdahl's parallel fraction p from S(2) = 1 / ((1 - p) + p / 2). With a
single accelerator (a GPU) only the 1-device figure is measured. --json writes the figures as
one JSON object (benchmarks/gpu_suite.sh).

Needs e3nn-jax and jax-md (and jraph, which jax-md imports), and villin's PDB: by default the
test.pdb shipped inside pdbfixer, else --pdb (benchmarks/gpu_prep.sh copies it to .whl/villin.pdb).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import device_info, median_time, write_json  # noqa: E402

try:
    from molgen.cg import allegro, neighbors  # e3nn-jax; jax-md (which imports jraph)
except ImportError as _e:
    sys.exit(f"cg_throughput.py needs e3nn-jax and jax-md (+ jraph): {_e}; see benchmarks/GPU.md for the wheels")
from molgen.cg import mdcath, priors, simulate  # noqa: E402
from molgen.core.distributed import make_mesh  # noqa: E402
from molgen.core.step import TrainState, global_batch, make_train_step, replicate  # noqa: E402

PRIORS = {
    "bond": {"kr": 60.0, "r0": 3.8},
    "angle": {"a": [0.5, -0.3, 0.1, 0.0, 0.0, 0.0], "b": [0.2, 0.1, -0.05, 0.0, 0.0, 0.0]},
    "dihedral": {"k": [0.4, 0.2, 0.1, 0.05], "gamma": [0.3, -1.0, 0.2, 0.0]},
    "repulsive": {"sigma": 4.5, "eps": 0.6},
    "excluded": {"sigma": [4.5, 4.8, 5.0, 5.2], "eps": 0.6},
}


PDB = {"path": ""}  # --pdb; empty: the villin test.pdb inside pdbfixer


def villin_pdb() -> str:
    if PDB["path"]:
        return PDB["path"]
    try:
        return simulate.villin_pdb()
    except ImportError as e:
        sys.exit(f"villin's PDB comes from the pdbfixer package ({e}): pass --pdb=PATH to a copy of pdbfixer's "
                 "tests/data/test.pdb (benchmarks/gpu_prep.sh puts one in .whl/villin.pdb)")  # fmt: skip


def villin_ca():
    top = mdcath.parse_topology(open(villin_pdb()).read(), "villin")
    xyz = np.asarray(
        [[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in open(villin_pdb()) if ln.startswith("ATOM")]
    )
    return xyz[top.ca_index].astype(np.float32), top.species


def system(copies: int):
    ca, species = villin_ca()
    side = int(np.ceil(copies ** (1 / 3)))
    offsets = [np.array([i, j, k]) * 60.0 for i in range(side) for j in range(side) for k in range(side)][:copies]
    x = np.concatenate([ca - ca.mean(0) + o for o in offsets]).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.tile(species, copies)), jnp.ones(len(x), bool), [len(ca)] * copies


def energy_forces(net, params, topo, prior_p):
    def total(x, spc, mask, c, n, v):
        e = jnp.sum(net.apply(params, x, spc, c, n, v) * mask)
        return e + priors.energy(prior_p, x, mask, topo)

    return jax.jit(jax.value_and_grad(total))


def bench_copies(copies, net, params, prior_p, fn, reps):
    x, spc, mask, chains = system(copies)
    n = len(x)
    ef = energy_forces(net, params, priors.topology(n, chains), prior_p)
    nbrs = fn.allocate(x)
    c, nb, v = neighbors.edges(nbrs.idx, n)
    pairs = np.stack(np.nonzero(~np.eye(n, dtype=bool)))
    ca, na, va = jnp.asarray(pairs[0]), jnp.asarray(pairs[1]), jnp.ones(pairs.shape[1], bool)
    t_nbr = median_time(lambda: jax.block_until_ready(ef(x, spc, mask, c, nb, v)), reps)
    t_all = median_time(lambda: jax.block_until_ready(ef(x, spc, mask, ca, na, va)), reps)
    update = jax.jit(fn.update)
    t_upd = median_time(lambda: jax.block_until_ready(update(x, nbrs).idx), reps)
    f1, f2 = ef(x, spc, mask, c, nb, v)[1], ef(x, spc, mask, ca, na, va)[1]
    atol = 1e-3 * float(jnp.abs(f2).max()) + 1e-4
    print(
        f"copies {copies:2d} ({n:4d} beads, {int(v.sum()):6d} edges in list, {n * (n - 1):7d} all pairs): "
        f"neighbour list {1 / t_nbr:8.1f} eval/s   all pairs {1 / t_all:8.1f} eval/s   "
        f"ratio {t_all / t_nbr:6.2f}x   list rebuild {t_upd * 1e3:6.2f} ms"
    )
    return {"copies": copies, "beads": n, "edges_in_list": int(v.sum()), "all_pairs": n * (n - 1),
            "eval_per_s_neighbor_list": 1 / t_nbr, "eval_per_s_all_pairs": 1 / t_all, "ratio": t_all / t_nbr,
            "list_rebuild_ms": t_upd * 1e3, "force_max_abs_diff": float(jnp.abs(f1 - f2).max()), "force_atol": atol,
            "agree": bool(np.allclose(f1, f2, atol=atol))}  # fmt: skip


def train_rate(n_dev, loss_fn, params, batch, reps):
    mesh = make_mesh(n_dev)
    state = replicate(TrainState.create(jax.tree.map(np.array, params), optax.adabelief(1e-3)), mesh)
    step = make_train_step(loss_fn, mesh)
    gb = global_batch(batch, mesh)
    holder = [state]

    def run():
        holder[0], m = step(holder[0], gb, jax.random.key(0))
        jax.block_until_ready(m)

    return len(batch["positions"]) / median_time(run, reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--cutoff", type=float, default=12.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--copies", default="1,4,16", help="system sizes: copies of villin")
    ap.add_argument("--pdb", default="", help="villin's PDB (default: the test.pdb inside pdbfixer)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    a = ap.parse_args()
    PDB["path"] = a.pdb
    net = allegro.Allegro(n_layers=a.layers, latent=a.latent, channels=a.channels, cutoff=a.cutoff, embed=8)
    prior_p = priors.as_jax(PRIORS)
    x1, s1, m1, _ = system(1)
    params = net.init(jax.random.key(0), x1, s1, *neighbors.edges(jnp.full((2, 1), len(x1)), len(x1)))
    fn = neighbors.neighbor_fn(a.cutoff)
    print(f"Allegro {a.layers} layers, latent {a.latent}, {a.channels} channels, cutoff {a.cutoff} Å + priors; "
          f"{jax.devices()[0].device_kind}")  # fmt: skip
    record = {"benchmark": "cg_throughput", **device_info(), "layers": a.layers, "latent": a.latent,
              "channels": a.channels, "cutoff": a.cutoff, "reps": a.reps, "copies": []}  # fmt: skip
    for copies in (int(c) for c in a.copies.split(",")):
        record["copies"].append(bench_copies(copies, net, params, prior_p, fn, a.reps))
        write_json(a.json, record)
    bad = [r["copies"] for r in record["copies"] if not r["agree"]]

    # training frames/s on 1 and 2 devices ------------------------------------------------------
    b = a.batch
    rng = np.random.default_rng(0)
    # unpadded frames (n_max = the bead count): what data.pad_frame gives, without the dataset module (TFDS)
    frames = [{"positions": np.asarray(x1) + rng.normal(0, 0.3, x1.shape).astype(np.float32),
               "forces": rng.normal(0, 20, x1.shape).astype(np.float32), "species": np.asarray(s1, np.int32),
               "mask": np.ones(len(x1), bool)} for _ in range(b)]  # fmt: skip
    batch = {k: np.stack([f[k] for f in frames]) for k in ("positions", "forces", "species", "mask")}
    topo = priors.topology(len(x1))
    cap = fn.allocate(x1).idx.shape[1] + 64
    template = fn.allocate(x1, extra_capacity=cap - fn.allocate(x1).idx.shape[1])

    def loss_fn(p, bt, rng_):
        def frame(xx, ss, mm):
            def e(y):
                nb_ = fn.update(y, template)
                cc, nn_, vv = neighbors.edges(nb_.idx, y.shape[0])
                return jnp.sum(net.apply(p, y, ss, cc, nn_, vv) * mm) + priors.energy(prior_p, y, mm, topo)

            return -jax.grad(e)(xx)

        f = jax.vmap(frame)(bt["positions"], bt["species"], bt["mask"])
        m = bt["mask"][..., None].astype(jnp.float32)
        return jnp.sum(m * (f - bt["forces"]) ** 2), {
            "weight": jnp.sum(m) * 3,
            "loss": jnp.sum(m * (f - bt["forces"]) ** 2),
        }

    if jax.device_count() < 2:  # one accelerator: no second device to split the batch over
        rate = train_rate(1, loss_fn, params, batch, a.reps)
        print(f"training (batch {b}, {len(x1)} beads): 1 device {rate:7.1f} frames/s   "
              f"(one {jax.devices()[0].device_kind}: no 2-device figure)")  # fmt: skip
        record["train"] = {"batch": b, "beads": len(x1), "frames_per_s_1_device": rate}
        write_json(a.json, record)
        finish(bad)
        return
    rates = {n_dev: train_rate(n_dev, loss_fn, params, batch, a.reps) for n_dev in (1, 2)}
    s2 = rates[2] / rates[1]
    p = min(1.0, max(0.0, 2 * (1 - 1 / s2)))
    amdahl = {k: 1 / ((1 - p) + p / k) for k in (4, 8)}
    print(
        f"training (batch {b}, {len(x1)} beads): 1 device {rates[1]:7.1f} frames/s   "
        f"2 devices {rates[2]:7.1f} frames/s   speedup {s2:4.2f}x   "
        f"Amdahl p = {p:.2f} (predicts {amdahl[4]:.2f}x on 4, {amdahl[8]:.2f}x on 8)"
    )
    print("(fake CPU devices share this machine's cores, so the 2-device figure measures overheads, not real scaling)")
    record["train"] = {"batch": b, "beads": len(x1), "frames_per_s_1_device": rates[1],
                       "frames_per_s_2_devices": rates[2], "speedup_2": s2, "amdahl_p": p,
                       "amdahl_predicted": {str(k): v for k, v in amdahl.items()},
                       "devices_are_fake_cpu": jax.devices()[0].platform == "cpu"}  # fmt: skip
    write_json(a.json, record)
    finish(bad)


def finish(bad):
    """The neighbour-list and all-pairs forces must agree (checked after every figure is written)."""
    assert not bad, f"the two implementations disagree at copies {bad}"


if __name__ == "__main__":
    main()
