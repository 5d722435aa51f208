"""Downstream heads of the interaction family: per-residue binding sites (family
atomica_binding_site) and interface embeddings (`embed`).

Binding sites: one protein with its partner removed (`data.build_sites`), each residue
labelled 1 when one of its atoms lies within 5 Å of the partner. The encoder reads a patch of
`site.patch` residues (the nearest by centroid to a centre residue) as one segment with its
global block; a head (MLP on each block's representation) gives a logit per residue, trained by
binary cross-entropy. Training draws a random centre per protein; prediction covers every
residue with patches centred by farthest-point sampling and takes each residue's logit from the
patch whose centre is nearest to it. `site.mode`: "finetune" trains encoder and head together
(`core.loop.fit`, one run per encoder under pretrained/ and random/); "frozen" (the quick
variant, a 2-core budget) keeps the encoder fixed and fits the head, a standardised logistic
regression, on each residue's invariant encoder features (block representation, scalars and
vector norms of the block and of its atoms), the linear probe of representation learning.
Three models, one split, one run:
1. `pretrained`: the encoder of an atomica_pretrain run (built when missing);
2. `random`: the same model and head from a random encoder;
3. `logistic`: logistic regression on residue type (one-hot) plus relative solvent
   accessibility (Shrake-Rupley, Biopython), scikit-learn.
In frozen mode also `pretrained+type_rsa` and `random+type_rsa`: the probe on the encoder
features together with type and RSA (what an encoder adds to the classical features).
Held-out metrics: per-residue AUROC and AUPRC pooled over the test proteins, with 95% intervals
from a bootstrap over proteins, and the paired bootstrap interval of each AUROC difference.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pathlib

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molgen.atomica import data as ad
from molgen.atomica import graph as gr
from molgen.atomica import model as am
from molgen.atomica import pretrain as apt
from molgen.atomica import sites
from molgen.chem import complexes as cx
from molgen.core import checkpoint, loop, upstream
from molgen.core.distributed import make_mesh
from molgen.core.records import as_str

log = logging.getLogger("molgen")
SITE_EXTRA = dict(extra_block=("label",))
SITE_KEYS = ("x", "element", "position", "atom_block", "block_type", "block_segment", "bonds", "label", "rsa")


class SiteModel(am.Sized):
    """The encoder with a per-residue (block) logit."""

    @nn.compact
    def __call__(self, b):
        enc = self.encoder()(b)
        h = jnp.concatenate([enc["block_repr"], am.scalars(enc["block_h"])], -1)
        return am.mlp((self.hidden, self.hidden, 1), name="site_head")(h)[:, 0]


def centroids(ex) -> np.ndarray:
    ab = np.asarray(ex["atom_block"])
    nb = len(ex["block_type"])
    c = np.zeros((nb, 3))
    np.add.at(c, ab, np.asarray(ex["x"], np.float64))
    return c / np.maximum(np.bincount(ab, minlength=nb), 1)[:, None]


def patch(ex, blocks: np.ndarray) -> dict:
    """The sub-record of `ex` holding `blocks` (sorted block indices), re-indexed."""
    blocks = np.sort(blocks)
    ab = np.asarray(ex["atom_block"])
    keep_a = np.isin(ab, blocks)
    new_b = np.full(len(ex["block_type"]), -1)
    new_b[blocks] = np.arange(len(blocks))
    new_a = np.cumsum(keep_a) - 1
    bonds = np.asarray(ex["bonds"]).reshape(-1, 2)
    bonds = bonds[keep_a[bonds[:, 0]] & keep_a[bonds[:, 1]]]
    out = {k: np.asarray(ex[k])[keep_a] for k in ("x", "element", "position")}
    out["atom_block"] = new_b[ab[keep_a]].astype(np.int32)
    for k in ("block_type", "block_segment", "label", "rsa"):
        out[k] = np.asarray(ex[k])[blocks]
    out["bonds"] = new_a[bonds].astype(np.int32).reshape(-1, 2)
    return out


def nearest(cen: np.ndarray, centre: int, size: int) -> np.ndarray:
    d = np.linalg.norm(cen - cen[centre], axis=1)
    return np.argsort(d, kind="stable")[:size]


def cover(ex, size: int) -> list[tuple[int, np.ndarray]]:
    """(centre, blocks) patches covering every residue: centres by farthest-point sampling
    among the residues not yet covered."""
    cen = centroids(ex)
    n = len(cen)
    covered, out = np.zeros(n, bool), []
    centre = 0
    dist = np.full(n, np.inf)
    while not covered.all():
        blocks = nearest(cen, centre, size)
        out.append((centre, blocks))
        covered[blocks] = True
        dist = np.minimum(dist, np.linalg.norm(cen - cen[centre], axis=1))
        centre = int(np.argmax(np.where(covered, -1.0, dist)))
    return out


def site_record(ex) -> dict:
    return {k: np.asarray(ex[k]) for k in SITE_KEYS}


def prepare_site(ex, rng, size: int) -> dict:
    rec = site_record(ex)
    blocks = nearest(centroids(rec), int(rng.integers(len(rec["block_type"]))), size)
    return gr.build(gr.with_globals(patch(rec, blocks)))


def make_loss(model):
    def loss_fn(params, b, rng):
        logit = model.apply({"params": params}, b)
        y = b["label"]
        m = ((y >= 0) & b["block_mask"]).astype(jnp.float32)
        yf = jnp.maximum(y, 0).astype(jnp.float32)
        bce = jnp.maximum(logit, 0) - logit * yf + jnp.log1p(jnp.exp(-jnp.abs(logit)))
        acc = ((logit > 0) == (yf > 0.5)).astype(jnp.float32)
        return jnp.sum(bce * m), {"loss": jnp.sum(bce * m), "acc": jnp.sum(acc * m), "pos": jnp.sum(yf * m),
                                  "weight": m.sum()}  # fmt: skip

    return loss_fn


def per_residue(fn, records: list, size: int, batch: int = 4) -> list[np.ndarray]:
    """Per protein, `fn(collated batch) -> (blocks, ...)` for each residue, read from the patch
    (`cover`) whose centre is nearest to it."""
    ladder = None
    jobs = [(i, centre, np.sort(blocks)) for i, ex in enumerate(records) for centre, blocks in cover(ex, size)]
    best = [np.full(len(ex["block_type"]), np.inf) for ex in records]
    out: list = [None] * len(records)
    cens = [centroids(ex) for ex in records]
    for s in range(0, len(jobs), batch):
        chunk = jobs[s : s + batch]
        gs = [gr.build(gr.with_globals(patch(records[i], blocks))) for i, _, blocks in chunk]
        if ladder is None:
            ladder = gr.Ladder(gr.base_capacity(gs, batch))
        b = gr.collate(gs, ladder.pick(gr.sizes(gs)), **SITE_EXTRA)
        vals = np.asarray(fn({k: jnp.asarray(v) for k, v in b.items()}))
        off = 0
        for (i, centre, blocks), g in zip(chunk, gs, strict=True):
            nb = len(g["block_type"])
            v = vals[off : off + nb][~g["block_global"]]  # this patch's residues, in `blocks` order
            off += nb
            if out[i] is None:
                out[i] = np.zeros((len(records[i]["block_type"]),) + v.shape[1:], np.float32)
            d = np.linalg.norm(cens[i][blocks] - cens[i][centre], axis=1)
            better = d < best[i][blocks]
            out[i][blocks[better]] = v[better]
            best[i][blocks[better]] = d[better]
    return out


def predict(model, params, records: list, size: int, batch: int = 4) -> list[np.ndarray]:
    """Per protein, the logit of each residue."""
    run = jax.jit(lambda b: model.apply({"params": params}, b))
    return per_residue(run, records, size, batch)


def encoder_features(enc_model, enc_params, records: list, size: int, batch: int = 4) -> list[np.ndarray]:
    """Per protein, each residue's frozen-encoder features, all invariant: its block
    representation, the scalars and the per-channel norms of the vectors and tensors of its
    block-level output, and the mean of its atoms' atom-level scalars and norms."""

    def invariants(h):
        return jnp.concatenate([am.scalars(h), e3nn.norm(h.filter(drop=["0e", "0o"])).array], -1)

    @jax.jit
    def run(b):
        o = enc_model.apply({"params": enc_params}, b)
        nb = b["block_type"].shape[0]
        atoms = am.segment_mean(invariants(o["atom_h"]), b["atom_block"], nb, b["atom_mask"])
        return jnp.concatenate([o["block_repr"], invariants(o["block_h"]), atoms], -1)

    return per_residue(run, records, size, batch)


def frozen_probe(train_feats, train_labels, test_feats, c: float = 1.0) -> list[np.ndarray]:
    """The head on frozen features: standardised features, logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    clf.fit(np.concatenate(train_feats), np.concatenate(train_labels))
    return [clf.decision_function(f) for f in test_feats]


# --- metrics -------------------------------------------------------------------------------------
def _auc(y, p):
    from sklearn.metrics import average_precision_score, roc_auc_score

    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def site_metrics(labels: list, scores: dict, n_boot: int = 1000, seed: int = 0, pairs=None) -> dict:
    """Pooled AUROC and AUPRC of each model's scores, 95% bootstrap intervals over proteins, and
    paired intervals of the AUROC differences `pairs` ((a, b): a minus b; default: the first
    model against each other)."""
    names = list(scores)
    rng = np.random.default_rng(seed)
    y_all = np.concatenate(labels)
    out = {}
    for nm in names:
        auroc, auprc = _auc(y_all, np.concatenate(scores[nm]))
        out[nm] = {"auroc": auroc, "auprc": auprc}
    boots = {nm: [] for nm in names}
    n = len(labels)
    for _ in range(n_boot):
        pick = rng.integers(n, size=n)
        y = np.concatenate([labels[i] for i in pick])
        if y.min() == y.max():
            continue
        for nm in names:
            boots[nm].append(_auc(y, np.concatenate([scores[nm][i] for i in pick])))
    for nm in names:
        b = np.asarray(boots[nm])
        out[nm]["auroc_ci"] = np.percentile(b[:, 0], [2.5, 97.5]).tolist()
        out[nm]["auprc_ci"] = np.percentile(b[:, 1], [2.5, 97.5]).tolist()
    for a, nm in pairs or [(names[0], nm) for nm in names[1:]]:
        d = np.asarray(boots[a])[:, 0] - np.asarray(boots[nm])[:, 0]
        out[f"{a}_minus_{nm}"] = {"auroc": out[a]["auroc"] - out[nm]["auroc"],
                                  "ci": np.percentile(d, [2.5, 97.5]).tolist()}  # fmt: skip
    out["residues"], out["positives"], out["proteins"] = int(len(y_all)), int(y_all.sum()), n
    return out


def residue_features(ex) -> np.ndarray:
    """One-hot residue type (20 amino acids and UNK) and relative solvent accessibility."""
    t = np.asarray(ex["block_type"]) - cx.AA_START
    t = np.where((t >= 0) & (t < len(cx.AA)), t, len(cx.AA))
    return np.concatenate([np.eye(len(cx.AA) + 1)[t], np.asarray(ex["rsa"])[:, None]], axis=1)


def logistic_baseline(train: list, test: list) -> list[np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([residue_features(ex) for ex in train])
    y = np.concatenate([np.asarray(ex["label"]) for ex in train])
    lr = LogisticRegression(max_iter=2000).fit(x, y)
    return [lr.decision_function(residue_features(ex)) for ex in test]


# --- training ------------------------------------------------------------------------------------
def pretrained_encoder(workdir: str, ex) -> tuple[dict, dict]:
    """(encoder parameters, model config) of an atomica_pretrain run; `ex`: any record (its
    shapes give the abstract parameters)."""
    info = json.loads((pathlib.Path(workdir) / "model.json").read_text())
    m = am.Pretrainer(**{k: info[k] for k in am.SIZE_KEYS})
    batch = apt.one_batch(ex)
    abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), batch)["params"])
    params = checkpoint.restore_params(workdir, abstract)
    return params["encoder"], info


def _sample_batch(rec):
    g = gr.build(gr.with_globals(patch(rec, np.arange(min(8, len(rec["block_type"]))))))
    cap = gr.Capacity(graphs=1)
    cap.fit(gr.sizes([g]))
    return {k: jnp.asarray(v) for k, v in gr.collate([g], cap, **SITE_EXTRA).items()}


def finetune(config, workdir: str, mesh, src, model, params, eval_recs):
    size = int(config.site.patch)
    loop.write_json(workdir, "model.json", {"kind": "atomica_site", **config.model.to_dict()})
    it = apt.pipeline(src["train"], config, mesh, config.train.seed, lambda ex, rng: prepare_site(ex, rng, size),
                      SITE_EXTRA)  # fmt: skip

    def eval_fn(p, step):
        if not eval_recs:
            return {}
        logits = predict(model, jax.device_get(p), eval_recs, size, config.site.eval_batch)
        y = np.concatenate([np.asarray(r["label"]) for r in eval_recs])
        auroc, auprc = _auc(y, np.concatenate(logits))
        return {"auroc": auroc, "auprc": auprc}

    state, _ = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=make_loss(model), train_data=it,
                        eval_fn=eval_fn, items_per_step=lambda m: float(config.train.batch_size),
                        item_name="patches", meta={"kind": "atomica_site"}, log_keys=("acc",))  # fmt: skip
    return jax.device_get(state.params)


def train_and_evaluate(config, workdir: str):
    mesh = make_mesh(config.mesh.num_devices)
    builder = sites.build(config.data, config.data.data_dir)
    rep = ad.report(builder)
    src = {s: builder.as_data_source(s) for s in ad.SPLITS}
    recs = {s: [site_record(src[s][i]) for i in range(len(src[s]))] for s in ad.SPLITS}
    log.info("binding sites: proteins %s, residues %s, positives %s", {s: len(recs[s]) for s in ad.SPLITS},
             rep["residues"], rep["positives"])  # fmt: skip
    sizes = {k: config.model[k] for k in am.SIZE_KEYS}  # rigid_head is the pretraining's alone
    model = SiteModel(**sizes)
    sample = _sample_batch(recs["train"][0])
    # seed + 1: the random encoder is not the pretraining run's own initialisation (seed)
    params0 = jax.device_get(jax.jit(model.init)(jax.random.key(config.train.seed + 1), sample)["params"])
    pre = upstream.ensure_run(config.pretrain_workdir, config.pretrain_config)
    enc, info = pretrained_encoder(pre, recs["train"][0])
    want = {k: info[k] for k in am.SIZE_KEYS}
    if want != sizes:
        raise ValueError(f"config.model {sizes} differs from the pretrained run's {want} ({pre})")
    results, scores = {}, {}
    sc = config.site
    train = recs["train"]
    if sc.mode == "frozen" and sc.max_train and len(train) > sc.max_train:
        pick = np.sort(np.random.default_rng(config.train.seed).choice(len(train), sc.max_train, replace=False))
        train = [train[i] for i in pick]
    if sc.mode == "frozen":
        enc_model = am.Encoder(**sizes)
        labels_tr = [np.asarray(r["label"]) for r in train]
        c_tr, c_te = [residue_features(r) for r in train], [residue_features(r) for r in recs["test"]]
        for name, ep in (("pretrained", enc), ("random", params0["encoder"])):
            f_tr = encoder_features(enc_model, ep, train, int(sc.patch), sc.eval_batch)
            f_te = encoder_features(enc_model, ep, recs["test"], int(sc.patch), sc.eval_batch)
            scores[name] = frozen_probe(f_tr, labels_tr, f_te, sc.C)
            # the same probe with the classical features added: what the encoder adds to them
            join = lambda f, c: [np.concatenate([a, b], 1) for a, b in zip(f, c, strict=True)]  # noqa: E731
            scores[f"{name}+type_rsa"] = frozen_probe(join(f_tr, c_tr), labels_tr, join(f_te, c_te), sc.C)
            log.info("binding sites: %s encoder features of %d + %d proteins done", name, len(train), len(recs["test"]))
        results["train_proteins"] = len(train)
    elif sc.mode == "finetune":
        for name in ("pretrained", "random"):
            # host copies: fit donates the device state it builds from them
            p = jax.tree.map(np.array, dict(params0, encoder=enc) if name == "pretrained" else params0)
            p = finetune(config, os.path.join(workdir, name), mesh, src, model, p, recs["validation"])
            scores[name] = predict(model, p, recs["test"], int(sc.patch), sc.eval_batch)
    else:
        raise ValueError(f"site.mode must be 'frozen' or 'finetune', got {sc.mode!r}")
    results["mode"] = sc.mode
    scores["logistic"] = logistic_baseline(train, recs["test"])  # the probes' training proteins
    labels = [np.asarray(r["label"]) for r in recs["test"]]
    pairs = [("pretrained", "random"), ("pretrained", "logistic")]
    if "pretrained+type_rsa" in scores:
        pairs += [("pretrained+type_rsa", "logistic"), ("pretrained+type_rsa", "random+type_rsa")]
    results["test"] = site_metrics(labels, scores, config.site.bootstrap, config.train.seed, pairs)
    results["pretrain_workdir"] = pre
    results["data"] = {k: rep[k] for k in ("proteins", "residues", "positives")}
    loop.write_json(workdir, "evaluation.json", results)
    for nm in scores:
        r = results["test"][nm]
        log.info("test %-10s AUROC %.3f [%.3f, %.3f]  AUPRC %.3f [%.3f, %.3f]", nm, r["auroc"], *r["auroc_ci"],
                 r["auprc"], *r["auprc_ci"])  # fmt: skip
    return results


# --- interface embeddings --------------------------------------------------------------------------
def embed(workdir: str, out: str, data_cfg=None, batch: int = 8, splits=ad.SPLITS) -> str:
    """One L2-normalised embedding per interface of the pretraining run's data (the `splits`, by
    default all): `out`.npz (embeddings, entry, structure file, segments, modality, split) and
    `out`.csv (the index)."""
    unknown = sorted(set(splits) - set(ad.SPLITS))
    if unknown or not splits:
        raise ValueError(f"embed: splits {list(splits)} must be a non-empty subset of {list(ad.SPLITS)}")
    info = json.loads((pathlib.Path(workdir) / "model.json").read_text())
    cfg = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    import ml_collections

    dcfg = data_cfg or ml_collections.ConfigDict(cfg["data"])
    builder = ad.build(dcfg, dcfg.data_dir)
    enc_model = am.Encoder(**{k: info[k] for k in am.SIZE_KEYS})
    rows, vecs, cap = [], [], gr.Capacity(graphs=batch)
    enc, _ = pretrained_encoder(workdir, builder.as_data_source("train")[0])
    run = jax.jit(enc_model.apply)
    for split in [sp for sp in ad.SPLITS if sp in splits]:
        s = builder.as_data_source(split)
        for st in range(0, len(s), batch):
            exs = [s[i] for i in range(st, min(st + batch, len(s)))]
            gs = [gr.build(gr.with_globals(apt.record(ex))) for ex in exs]
            cap.fit(gr.sizes(gs))
            o = run({"params": enc}, {k: jnp.asarray(v) for k, v in gr.collate(gs, cap).items()})
            vecs.append(np.asarray(o["graph_repr"])[: len(gs)])
            rows += [{"index": len(rows) + j, "split": split, "entry": as_str(ex["entry"]),
                      "structure": as_str(ex["file"]), "segments": as_str(ex["segments"]),
                      "modality": ad.MODALITIES[int(ex["modality"])]} for j, ex in enumerate(exs)]  # fmt: skip
    emb = np.concatenate(vecs).astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    np.savez(out + ".npz", embeddings=emb, **{k: np.array([r[k] for r in rows]) for k in rows[0] if k != "index"})
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    log.info("wrote %d interface embeddings (dim %d) to %s.npz and %s.csv", len(emb), emb.shape[1], out, out)
    return out + ".npz"
