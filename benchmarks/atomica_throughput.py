"""ATOMICA pretraining throughput: training steps/s and atoms/s of the `depthwise` tensor product
against ATOMICA's `fully_connected` one, in the same run on the same batches, and the host's
graph building (noise + k-NN graphs + padding) against the step rate.

    python benchmarks/atomica_throughput.py [--batch=4] [--steps=5] [--json=PATH]

Builds the shipped interfaces (third_party/data/complexes) once. The batches are the first
`--steps` training batches of the quick pipeline's noise (fixed seed). Each tensor product is
timed as a jitted value-and-gradient plus Adam update over those batches after one warm-up
call per batch shape; host graph building is timed per batch on one core. Ratios: against
`fully_connected` (speed-up of `depthwise`), and step time over graph-building time (above 1:
the host keeps up with one reader thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import device_info, write_json  # noqa: E402
from configs import atomica as acfg  # noqa: E402
from molgen.atomica import graph as gr  # noqa: E402
from molgen.atomica import model as am  # noqa: E402
from molgen.atomica import pretrain as apt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="interfaces per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (distinct batches)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cfg = acfg.pretrain("quick")
    builder = apt.build_data(cfg)
    src = builder.as_data_source("train")
    freq = apt.block_frequencies(src)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(src))[: args.batch * args.steps]
    t = time.perf_counter()
    groups = []
    for s in range(args.steps):
        groups.append([apt.prepare(src[int(i)], rng) for i in order[s * args.batch : (s + 1) * args.batch]])
    build_s = (time.perf_counter() - t) / args.steps
    cap = gr.Capacity(graphs=args.batch)
    for gs in groups:
        cap.fit(gr.sizes(gs))  # one capacity for all batches: one compilation per model
    t = time.perf_counter()
    batches = [{k: jnp.asarray(v) for k, v in gr.collate(gs, cap, **apt.EXTRA).items()} for gs in groups]
    pad_s = (time.perf_counter() - t) / args.steps
    atoms = float(np.mean([b["atom_mask"].sum() for b in batches]))
    rows = {}
    for tp in ("fully_connected", "depthwise"):
        model = am.Pretrainer(tp=tp)
        params = jax.jit(model.init)(jax.random.key(0), batches[0])["params"]
        tx = optax.adam(1e-4)
        opt = tx.init(params)
        loss_fn = apt.make_loss(model, freq)

        @jax.jit
        def step(p, o, b, loss_fn=loss_fn, tx=tx):
            (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, None)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, aux["loss"]

        t = time.perf_counter()
        params, opt, _ = jax.block_until_ready(step(params, opt, batches[0]))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for b in batches:
            params, opt, loss = step(params, opt, b)
        jax.block_until_ready(loss)
        sec = (time.perf_counter() - t) / len(batches)
        rows[tp] = {"step_s": sec, "steps_per_s": 1 / sec, "atoms_per_s": atoms / sec, "compile_s": compile_s,
                    "params": int(sum(x.size for x in jax.tree.leaves(params)))}  # fmt: skip
    base = rows["fully_connected"]["step_s"]
    print(f"{device_info()} | batch {args.batch} interfaces, {atoms:.0f} atoms per step (mean), capacity {cap}")
    print(f"{'tensor product':<16} {'params':>9} {'s/step':>8} {'steps/s':>8} {'atoms/s':>9} {'speed-up':>9}")
    for tp, r in rows.items():
        print(f"{tp:<16} {r['params']:>9d} {r['step_s']:>8.3f} {r['steps_per_s']:>8.2f} {r['atoms_per_s']:>9.0f} "
              f"{base / r['step_s']:>8.2f}x")  # fmt: skip
    host = build_s + pad_s
    print(f"host graph building: {build_s:.3f} s noise+graphs and {pad_s:.3f} s padding per step of {args.batch} "
          f"interfaces; step/host ratio: depthwise {rows['depthwise']['step_s'] / host:.2f}, "
          f"fully_connected {base / host:.2f} (> 1: one reader thread keeps up)")  # fmt: skip
    if args.json:
        write_json(args.json, {"device": device_info(), "batch": args.batch, "atoms": atoms, "models": rows,
                               "host_build_s": build_s, "host_pad_s": pad_s})  # fmt: skip


if __name__ == "__main__":
    main()
