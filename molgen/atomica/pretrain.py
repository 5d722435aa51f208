"""Training entry point of atomica_pretrain (config.family): ATOMICA's denoising and masking
pretraining on the shared runtime (core.loop.fit: shard_map step, Orbax resume, JSONL and
TensorBoard metrics, NaN guard).

Data: the interfaces of `atomica.data`; each training item is noised afresh every time it is
drawn (`noise.corrupt`, seeded by Grain's per-index generator, so a resumed run draws the same
noise) and turned into its graphs on the host (`graph.build`), in Grain's reader thread.
`GraphBatches` pads each step's items to one flat graph per device at the smallest level of a
capacity ladder (`graph.Ladder`: level 0 sized from the first training items, each level twice
the last) that holds every device's batch, so padding stays under 2x with one compilation per
level used; processes agree on the level through an all-gather. It checkpoints the Grain
iterator underneath.

Loss per interface (ATOMICA's weights): translation |eps * t + z|^2 / 3 + 0.1 rotation
|r - score|^2 / 3 + torsion mean (tau - score)^2 over its bonds + the cross-entropy of its masked
blocks (mean over them), averaged over interfaces. Each is logged with its trivial baseline:
a zero prediction for the three scores (`*_base`), and the training set's block-type
frequencies for the masked blocks (`mask_base_ce`, `mask_base_acc`: the most frequent type).
Evaluation: every validation (and, at the end, test) interface with fixed noise, the same
quantities, written to `evaluation.json`.
"""

from __future__ import annotations

import json
import logging
import zlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from molgen.atomica import data as ad
from molgen.atomica import graph as gr
from molgen.atomica import model as am
from molgen.atomica import noise
from molgen.chem import complexes as cx
from molgen.core import loop, streams
from molgen.core.distributed import make_mesh
from molgen.core.records import as_str

log = logging.getLogger("molgen")
RECORD_KEYS = ("x", "element", "position", "atom_block", "block_type", "block_segment", "bonds")
EXTRA = dict(extra_atom=("atom_noised",), extra_block=("mask_target",),
             extra_graph=("tr_z", "tr_eps", "rot_score", "rot_ok"))  # fmt: skip
WEIGHTS = dict(trans=1.0, rot=0.1, tor=1.0, mask=1.0)


def record(ex) -> dict:
    return {k: np.asarray(ex[k]) for k in RECORD_KEYS}


def prepare(ex, rng, mask_ratio: float = noise.MASK_RATIO) -> dict:
    """One interface, noised, with its graphs (host side)."""
    return gr.build(gr.with_globals(noise.corrupt(record(ex), rng, mask_ratio)))


def build_data(config):
    return ad.build(config.data, config.data.data_dir)


def block_frequencies(source) -> np.ndarray:
    """Frequency of each block type among the training interfaces' blocks (a floor of 1 count)."""
    counts = np.ones(cx.n_block_types())
    for i in range(len(source)):
        np.add.at(counts, np.asarray(source[i]["block_type"]), 1)
    counts[[cx.PAD, cx.MASK, cx.GLB]] = 0
    return counts / counts.sum()


class GraphBatches:
    """This process's padded graph batches (one flat graph per local device, concatenated) from
    an iterator of per-device lists of graphs; checkpoints the iterator underneath."""

    def __init__(self, it, ladder: gr.Ladder, extras: dict | None = None):
        self.it, self.ladder, self.extras = it, ladder, EXTRA if extras is None else extras

    def __iter__(self):
        return self

    def __next__(self):
        per_dev = next(self.it)
        need = {k: max(gr.sizes(gs)[k] for gs in per_dev) for k in gr.SIZES}
        if jax.process_count() > 1:  # every process pads to the same shapes
            allg = multihost_utils.process_allgather(np.array([need[k] for k in gr.SIZES]))
            need = dict(zip(gr.SIZES, np.asarray(allg).reshape(-1, len(gr.SIZES)).max(0).tolist(), strict=True))
        cap = self.ladder.pick(need)
        parts = [gr.collate(gs, cap, **self.extras) for gs in per_dev]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, state) -> None:
        self.it.set_state(json.loads(state) if isinstance(state, (bytes, str)) else state)

    def start_prefetch(self) -> None:  # Grain's checkpoint handler calls it after set_state
        if hasattr(self.it, "start_prefetch"):
            self.it.start_prefetch()


def pipeline(source, config, mesh, seed: int, prepare_fn=None, extras: dict | None = None) -> GraphBatches:
    """This process's `GraphBatches` of `source`: `prepare_fn(record, rng)` (default: the
    pretraining noise and graphs) on every drawn item, in Grain's reader thread."""
    n_streams = mesh.shape["data"]
    rows = streams.rows_per_stream(config.train.batch_size, n_streams)
    if prepare_fn is None:
        ratio = float(config.noise.mask_ratio)
        prepare_fn = lambda ex, rng: prepare(ex, rng, ratio)  # noqa: E731

    def one(stream):
        ds = streams.device_stream(source, stream, n_streams, seed, train=True)
        ds = ds.random_map(prepare_fn, seed=seed + 7919 * stream)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
        return it.batch(rows, drop_remainder=True, batch_fn=list)

    zipped = grain.experimental.ZipIterDataset(parents=[one(s) for s in loop.local_streams(mesh)])
    # level 0 from the first training items as prepared (the same on every process)
    rng = np.random.default_rng(seed)
    sample = [prepare_fn(source[i], rng) for i in range(min(len(source), int(config.capacity.sample)))]
    return GraphBatches(iter(zipped), gr.Ladder(gr.base_capacity(sample, rows)), extras)


def per_graph_losses(out, b, log_freq):
    """Per-interface losses and their baselines, (graphs,) each, and the graph mask."""
    ng = b["graph_mask"].shape[0]
    gm = b["graph_mask"].astype(jnp.float32)
    tr = ((b["tr_eps"][:, None] * out["trans"] + b["tr_z"]) ** 2).mean(-1)
    tr_base = (b["tr_z"] ** 2).mean(-1)
    rot = ((out["rot"] - b["rot_score"]) ** 2).mean(-1) * b["rot_ok"]
    rot_base = (b["rot_score"] ** 2).mean(-1) * b["rot_ok"]
    tmask = b["tor_mask"]
    tor = am.segment_mean((out["tor"] - b["tor_score"]) ** 2, b["tor_graph"], ng, tmask)
    tor_base = am.segment_mean(b["tor_score"] ** 2, b["tor_graph"], ng, tmask)
    target = b["mask_target"]
    mmask = (target >= 0) & b["block_mask"]
    t = jnp.maximum(target, 0)
    logp = jax.nn.log_softmax(out["mask_logits"], -1)
    ce = -jnp.take_along_axis(logp, t[:, None], -1)[:, 0]
    acc = (out["mask_logits"].argmax(-1) == t).astype(jnp.float32)
    base_ce = -jnp.log(log_freq[t])
    base_acc = (t == jnp.argmax(log_freq)).astype(jnp.float32)
    per = lambda v: am.segment_mean(v, b["block_graph"], ng, mmask)  # noqa: E731
    return {"trans": tr, "trans_base": tr_base, "rot": rot, "rot_base": rot_base, "tor": tor, "tor_base": tor_base,
            "mask": per(ce), "mask_base_ce": per(base_ce), "mask_acc": per(acc), "mask_base_acc": per(base_acc),
            "has_tor": am.segment_mean(tmask.astype(jnp.float32), b["tor_graph"], ng, tmask),
            "rot_ok": b["rot_ok"]}, gm  # fmt: skip


def make_loss(model, freq):
    log_freq = jnp.asarray(freq, jnp.float32)

    def loss_fn(params, b, rng):
        out = model.apply({"params": params}, b)
        per, gm = per_graph_losses(out, b, log_freq)
        total = sum(WEIGHTS[k] * per[k] for k in WEIGHTS)
        aux = {k: jnp.sum(v * gm) for k, v in per.items()}
        aux["loss"], aux["weight"] = jnp.sum(total * gm), gm.sum()
        return jnp.sum(total * gm), aux

    return loss_fn


def summarize(sums: dict, n: float) -> dict:
    """Means over interfaces: losses, baselines and their ratios (torsion and rotation over the
    interfaces that have them)."""
    m = {k: v / max(n, 1e-9) for k, v in sums.items() if k != "weight"}
    out = dict(m)
    for k in ("trans", "rot", "tor"):
        out[f"{k}_ratio"] = m[k] / max(m[f"{k}_base"], 1e-12)
    out["mask_acc_ratio"] = m["mask_acc"] / max(m["mask_base_acc"], 1e-12)
    out["loss"] = sum(WEIGHTS[k] * m[k] for k in WEIGHTS)
    return out


def item_key(ex, default: int) -> int:
    """A stable integer for an interface record (its file, entry and segments), so its evaluation
    noise does not depend on which other items are evaluated with it; `default` without them."""
    parts = [ex[k] for k in ("file", "entry", "segments") if k in ex]
    if not parts:
        return default
    return zlib.crc32("|".join(as_str(p) for p in parts).encode())


def make_evaluator(model, freq, batch: int = 8, seed: int = 0):
    """`evaluate(params, items) -> dict`: losses, baselines and ratios over `items` (records)
    with fixed noise per (seed, item: `item_key`); one jitted function and one capacity ladder (level 0
    from the first call's items) for all calls."""
    log_freq = jnp.asarray(freq, jnp.float32)
    ladder = None

    @jax.jit
    def run(p, b):
        per, gm = per_graph_losses(model.apply({"params": p}, b), b, log_freq)
        return {k: jnp.sum(v * gm) for k, v in per.items()}

    def evaluate(params, items: list) -> dict:
        nonlocal ladder
        sums, n = {}, 0
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            gs = [prepare(ex, np.random.default_rng([seed, item_key(ex, s + i)])) for i, ex in enumerate(chunk)]
            if ladder is None:
                ladder = gr.Ladder(gr.base_capacity(gs, batch))
            cap = ladder.pick(gr.sizes(gs))
            out = jax.device_get(run(params, {k: jnp.asarray(v) for k, v in gr.collate(gs, cap, **EXTRA).items()}))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += len(gs)
        res = summarize(sums, n)
        res["n"] = n
        return res

    return evaluate


def combine(results: list) -> dict:
    """The summary over the union of disjoint item sets from their summaries (`evaluate`)."""
    n = sum(r["n"] for r in results)
    raw = [k for k in results[0] if not k.endswith("_ratio") and k not in ("loss", "n")]
    out = summarize({k: sum(r[k] * r["n"] for r in results) for k in raw}, n)
    out["n"] = n
    return out


def make_model(mc) -> am.Pretrainer:
    return am.Pretrainer(**{k: mc[k] for k in am.SIZE_KEYS}, rigid_head=mc.rigid_head)


def one_batch(item, seed: int = 0) -> dict:
    """A pretraining batch of one record, noised with `seed` (for initialising parameters)."""
    g = prepare(item, np.random.default_rng(seed))
    cap = gr.Capacity(graphs=1)
    cap.fit(gr.sizes([g]))
    return {k: jnp.asarray(v) for k, v in gr.collate([g], cap, **EXTRA).items()}


def init_params(model, item, seed: int):
    return jax.jit(model.init)(jax.random.key(seed), one_batch(item, seed))["params"]


def train_and_evaluate(config, workdir: str):
    mesh = make_mesh(config.mesh.num_devices)
    builder = build_data(config)
    rep = ad.report(builder)
    src = {s: builder.as_data_source(s) for s in ad.SPLITS}
    freq = block_frequencies(src["train"])
    model = make_model(config.model)
    params = init_params(model, src["train"][0], config.train.seed)
    log.info("ATOMICA pretraining: %d parameters (tp %s); interfaces %s", sum(x.size for x in jax.tree.leaves(params)),
             config.model.tp, {s: len(src[s]) for s in ad.SPLITS})  # fmt: skip
    loop.write_json(workdir, "model.json", {"kind": "atomica_pretrain", **config.model.to_dict(),
                                            "block_types": cx.n_block_types(), "data": rep["interfaces"]})  # fmt: skip
    first = lambda split: [src[split][i] for i in range(min(len(src[split]), config.eval.max_items or 10**9))]  # noqa: E731
    val = first("validation")

    evaluate = make_evaluator(model, freq, config.eval.batch, config.eval.seed)

    def eval_fn(p, step):
        return evaluate(jax.device_get(p), val)

    it = pipeline(src["train"], config, mesh, config.train.seed)
    state, last = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=make_loss(model, freq), train_data=it,
                           eval_fn=eval_fn, items_per_step=lambda m: float(config.train.batch_size),
                           item_name="interfaces", meta={"kind": "atomica_pretrain"},
                           log_keys=("trans", "trans_base", "tor", "tor_base", "mask_acc"))  # fmt: skip
    params = jax.device_get(state.params)
    test = first("test")
    # each test item evaluated once: per modality, then combined
    by_mod = {m: [ex for ex in test if int(ex["modality"]) == i] for i, m in enumerate(ad.MODALITIES)}
    by_mod = {m: evaluate(params, items) for m, items in by_mod.items() if items}
    result = {"test": combine(list(by_mod.values())), "test_by_modality": by_mod,
              "validation": last if last.get("n") else evaluate(params, val),  # the final step's evaluation
              "data": rep["interfaces"], "skipped": len(rep["skipped"])}  # fmt: skip
    loop.write_json(workdir, "evaluation.json", result)
    t = result["test"]
    log.info("test: translation %.3f (baseline %.3f, ratio %.3f), torsion %.3f (baseline %.3f), rotation ratio %.3f, "
             "mask top-1 %.3f (frequency %.3f, x%.2f)", t["trans"], t["trans_base"], t["trans_ratio"], t["tor"],
             t["tor_base"], t["rot_ratio"], t["mask_acc"], t["mask_base_acc"], t["mask_acc_ratio"])  # fmt: skip
    return result
