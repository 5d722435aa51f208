"""Training entry points of the crystal family (config.family): crystal_vae, crystal_ldm and
crystal_predictor. Each trains on the shared runtime (core.loop.fit: the shard_map step,
Orbax checkpoints with resume, metric writers, NaN guard) and writes its evaluation into the
workdir. The LDM and the predictor read a finished VAE workdir (`config.vae_workdir`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from molgen.chem import crystal as xtal
from molgen.core import checkpoint, loop
from molgen.core import step as core_step
from molgen.core.distributed import make_mesh
from molgen.crystal import diffusion, sample, vae

# the dataset (TFDS) and its Grain pipeline are imported where they are used: sampling from a
# trained or freshly initialised model (benchmarks/crystal_sampling.py) needs neither

log = logging.getLogger("molgen")
KEYS = ("lattice", "params", "frac", "species", "mask", "properties")


def build_data(config):
    from molgen.crystal import data

    if jax.process_index() == 0:
        b = data.build(config.data, config.data.data_dir)
        r = data.report(b)
        log.info("dataset %s: %s, n_max %d, %d rows skipped", b.data_dir, r["examples"], r["n_max"], len(r["skipped"]))
    multihost_utils.sync_global_devices("molgen_crystal_data_built")
    return data.build(config.data, config.data.data_dir)


def pipeline(source, config, mesh, seed, train=True):
    from molgen.core import streams as streams_lib

    streams, n_streams = loop.local_streams(mesh), mesh.shape["data"]
    return streams_lib.array_pipeline(source, KEYS, global_batch=config.train.batch_size, seed=seed,
                                      streams=streams, n_streams=n_streams, train=train)  # fmt: skip


def make_vae(mc, n_max: int) -> vae.CrystalVAE:
    return vae.CrystalVAE(dim=mc.dim, heads=mc.heads, enc_layers=mc.enc_layers, dec_layers=mc.dec_layers,
                          latent=mc.latent, n_max=n_max, n_fourier=mc.n_fourier)  # fmt: skip


def example_batch(n_max: int, rows: int = 2) -> dict:
    """A shape-only batch (one atom type, unit cells) for initialising or templating parameters."""
    return {"species": np.ones((rows, n_max), np.int32), "frac": np.zeros((rows, n_max, 3), np.float32),
            "lattice": np.tile(np.eye(3, dtype=np.float32), (rows, 1, 1)),
            "mask": np.ones((rows, n_max), bool)}  # fmt: skip


def eval_means(eval_step, params, mesh, split: dict, batch_size: int, key) -> dict:
    """Means of the shared eval step's metrics over a whole split."""
    ms = [
        jax.device_get(eval_step(params, core_step.global_batch(b, mesh), key)) for b, _ in batches(split, batch_size)
    ]
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0] if k != "weight"}


def init_vae(model: vae.CrystalVAE, seed: int, split: dict):
    b = {k: jnp.asarray(split[k][:2]) for k in ("species", "frac", "lattice", "mask")}
    return model.init(jax.random.key(seed), b["species"], b["frac"], b["lattice"], b["mask"], jax.random.key(0))[
        "params"
    ]


def batches(split: dict, size: int, keys=KEYS, limit: int = 0):
    """Fixed-size host batches over a whole split (the last one padded by repeating row 0);
    yields (batch, number of real rows)."""
    n = len(split["mask"]) if not limit else min(limit, len(split["mask"]))
    for s in range(0, n, size):
        idx = np.arange(s, s + size)
        real = int(min(size, n - s))
        idx[real:] = 0
        yield {k: split[k][idx] for k in keys}, real


def reconstruct(model, params, split: dict, limit: int = 0, batch: int = 256) -> dict:
    """Encode with the posterior means, decode, and match against the inputs with StructureMatcher:
    match rate, RMSE of matched pairs (normalised by (V/N)^(1/3)), species accuracy."""
    from molgen.crystal import data

    @jax.jit
    def run(p, b):
        mu, _ = model.apply({"params": p}, b["species"], b["frac"], b["lattice"], b["mask"], method=model.encode)
        return model.apply({"params": p}, mu, b["mask"], method=model.decode)

    sm, matched, rms, n, acc = xtal.matcher(), 0, [], 0, []
    for b, real in batches(split, batch, limit=limit):
        out = jax.device_get(run(params, b))
        preds = sample.to_crystals(out, b["mask"])
        for i in range(real):
            ref = data.unpad({k: b[k][i] for k in ("lattice", "frac", "species", "mask")})
            m = b["mask"][i]
            acc.append(float(np.mean(out["species_logits"][i][m].argmax(-1) + 1 == b["species"][i][m])))
            r = xtal.match_rms(preds[i], ref, sm) if preds[i] is not None else None
            n += 1
            if r is not None:
                matched += 1
                rms.append(r)
    return {"match_rate": matched / max(n, 1), "rmse": float(np.mean(rms)) if rms else float("nan"),
            "species_acc": float(np.mean(acc)), "n": n}  # fmt: skip


def train_vae(config, workdir: str):
    from molgen.crystal import data

    mesh = make_mesh(config.mesh.num_devices)
    builder = build_data(config)
    src = builder.as_data_source()
    splits = {s: data.load_split(src[s]) for s in data.SPLITS}
    n_max = splits["train"]["mask"].shape[1]
    model = make_vae(config.model, n_max)
    loop.write_json(workdir, "model.json", {"kind": "crystal_vae", "n_max": n_max, **config.model.to_dict(),
                                            "data": config.data.to_dict()})  # fmt: skip
    params = init_vae(model, config.train.seed, splits["train"])
    log.info("VAE: %d parameters, n_max %d", sum(x.size for x in jax.tree.leaves(params)), n_max)
    loss_fn = vae.make_loss(model, config.loss, config.augment)
    eval_loss_fn = vae.make_loss(model, config.loss, ml_collections.ConfigDict(dict(rotate=False, translate=False)))
    eval_step = core_step.make_eval_step(eval_loss_fn, mesh)

    def eval_fn(p, step):
        out = eval_means(eval_step, p, mesh, splits["validation"], config.train.batch_size, jax.random.key(0))
        rec = reconstruct(model, p, splits["validation"], limit=config.eval.match_n)
        out.update({k: v for k, v in rec.items() if np.isfinite(v)})  # no RMSE while nothing matches
        return out

    it = pipeline(src["train"], config, mesh, config.train.seed)
    state, _ = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=loss_fn, train_data=it, eval_fn=eval_fn,
                        items_per_step=lambda m: config.train.batch_size, item_name="crystals",
                        meta={"kind": "crystal_vae"})  # fmt: skip
    params = jax.device_get(state.params)
    result = {"test": reconstruct(model, params, splits["test"], limit=config.eval.test_n)}
    result["dataset"] = data.report(builder)["examples"]
    loop.write_json(workdir, "evaluation.json", result)
    t = result["test"]
    log.info("VAE test reconstruction: match rate %.4f, RMSE %.4f, species accuracy %.4f over %d crystals",
             t["match_rate"], t["rmse"], t["species_acc"], t["n"])  # fmt: skip
    return result


def load_vae(workdir: str):
    """(model, params, model.json) of a finished VAE workdir."""
    wd = pathlib.Path(workdir).expanduser()
    if not (wd / "model.json").exists():
        raise FileNotFoundError(
            f"vae_workdir={workdir!r}: no model.json; train it first with an experiments/crystal_vae_*.py config"
        )
    info = json.loads((wd / "model.json").read_text())
    if info.get("kind") != "crystal_vae":
        raise ValueError(f"vae_workdir={workdir!r}: model.json is a {info.get('kind')!r}, not a crystal_vae")
    mc = ml_collections.ConfigDict(
        {k: info[k] for k in ("dim", "heads", "enc_layers", "dec_layers", "latent", "n_fourier")}
    )
    model = make_vae(mc, info["n_max"])
    template = jax.eval_shape(lambda: init_vae(model, 0, example_batch(info["n_max"])))
    params = checkpoint.restore_params(os.path.join(wd, "checkpoints"), template)
    return model, params, info


# ----------------------------------------------------------------------------- shared VAE pieces


def vae_data_config(info: dict, config):
    """The data group of the VAE run (one source of truth for the dataset), with this run's
    data_dir."""
    d = ml_collections.ConfigDict(info["data"])
    d.data_dir = config.data_dir
    return d


def load_splits(config, info):
    from molgen.crystal import data

    dcfg = vae_data_config(info, config)
    holder = ml_collections.ConfigDict({"data": dcfg})
    builder = build_data(holder)
    src = builder.as_data_source()
    return builder, src, {s: data.load_split(src[s]) for s in data.SPLITS}, dcfg


def encode_split(model, params, split, batch: int = 512) -> np.ndarray:
    """Posterior means (n, N, latent) of a whole split, zero on padded atoms."""
    run = jax.jit(lambda p, b: model.apply({"params": p}, b["species"], b["frac"], b["lattice"], b["mask"],
                                           method=model.encode)[0])  # fmt: skip
    out = [np.asarray(run(params, b))[:real] for b, real in batches(split, batch)]
    return np.concatenate(out)


def crystals_of(split) -> list:
    from molgen.crystal import data

    return [
        data.unpad({k: split[k][i] for k in ("lattice", "frac", "species", "mask")}) for i in range(len(split["mask"]))
    ]


def property_index(dcfg, name: str) -> int:
    props = list(dcfg.properties)
    if name not in props:
        raise ValueError(
            f"property {name!r} is not among the dataset's properties {props} (data.properties of the VAE run)"
        )
    return props.index(name)


# ----------------------------------------------------------------------------- predictor


def make_predictor(config, n_targets: int):
    return vae.Mlp((*config.model.hidden, n_targets))


def init_predictor(net, feats, n_max: int, seed: int):
    return net.init(jax.random.key(seed), feats(example_batch(n_max)))["params"]


def predictor_features(vmodel, vparams):
    def fn(b):
        f = vmodel.apply({"params": vparams}, b["species"], b["frac"], b["lattice"], b["mask"], method=vmodel.features)
        return jax.lax.stop_gradient(f)

    return fn


def train_predictor(config, workdir: str):
    mesh = make_mesh(config.mesh.num_devices)
    vmodel, vparams, info = load_vae(config.vae_workdir)
    builder, src, splits, dcfg = load_splits(config, info)
    idx = np.asarray([property_index(dcfg, t) for t in config.targets])
    y = splits["train"]["properties"][:, idx]
    mean, std = np.nanmean(y, 0), np.nanstd(y, 0) + 1e-6
    net = make_predictor(config, len(idx))
    feats = predictor_features(vmodel, vparams)
    params = init_predictor(net, feats, vmodel.n_max, config.train.seed)
    loop.write_json(workdir, "model.json", {"kind": "crystal_predictor", "targets": list(config.targets),
                                            "mean": mean.tolist(), "std": std.tolist(),
                                            "hidden": list(config.model.hidden),
                                            "vae_workdir": os.path.abspath(config.vae_workdir)})  # fmt: skip

    def loss_fn(p, b, rng):
        pred = net.apply({"params": p}, feats(b))
        tgt = (b["properties"][:, idx] - mean) / std
        ok = jnp.isfinite(tgt)
        err = jnp.where(ok, pred - jnp.nan_to_num(tgt), 0.0) ** 2
        total = err.sum()
        return total, {"loss": total, "weight": ok.sum().astype(jnp.float32)}

    def predict(p, split):
        run = jax.jit(lambda p, b: net.apply({"params": p}, feats(b)) * std + mean)
        return np.concatenate([np.asarray(run(p, b))[:real] for b, real in batches(split, 512)])

    def mae(p, split):
        pred, ref = predict(p, split), split["properties"][:, idx]
        out = {}
        for j, t in enumerate(config.targets):
            ok = np.isfinite(ref[:, j])
            out[f"mae_{t}"] = float(np.abs(pred[ok, j] - ref[ok, j]).mean())
            out[f"baseline_mae_{t}"] = float(np.abs(mean[j] - ref[ok, j]).mean())
        out["loss"] = float(sum(out[f"mae_{t}"] / std[j] for j, t in enumerate(config.targets)))  # keep-best metric
        return out

    it = pipeline(src["train"], config, mesh, config.train.seed)
    state, _ = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=loss_fn, train_data=it,
                        eval_fn=lambda p, step: mae(p, splits["validation"]),
                        items_per_step=lambda m: config.train.batch_size, item_name="crystals")  # fmt: skip
    result = {"test": mae(jax.device_get(state.params), splits["test"]), "targets": list(config.targets)}
    loop.write_json(workdir, "evaluation.json", result)
    for t in config.targets:
        log.info("predictor test MAE %s: %.4f (predict-the-mean %.4f)", t, result["test"][f"mae_{t}"],
                 result["test"][f"baseline_mae_{t}"])  # fmt: skip
    return result


def load_predictor(workdir: str):
    """predict(crystal batch dict) -> (B, targets) of a finished predictor workdir, its VAE and
    model.json."""
    wd = pathlib.Path(workdir).expanduser()
    if not (wd / "model.json").exists():
        raise FileNotFoundError(
            f"predictor_workdir={workdir!r}: no model.json; train an experiments/crystal_predictor_*.py first"
        )
    info = json.loads((wd / "model.json").read_text())
    vmodel, vparams, _ = load_vae(info["vae_workdir"])
    net = vae.Mlp((*info["hidden"], len(info["targets"])))
    feats = predictor_features(vmodel, vparams)
    template = jax.eval_shape(lambda: init_predictor(net, feats, vmodel.n_max, 0))
    params = checkpoint.restore_params(os.path.join(wd, "checkpoints"), template)
    mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
    run = jax.jit(lambda b: net.apply({"params": params}, feats(b)) * std + mean)
    return run, info


# ----------------------------------------------------------------------------- latent diffusion


def make_dit(config, latent: int, n_max: int) -> diffusion.DiT:
    mc = config.model
    return diffusion.DiT(dim=mc.dim, heads=mc.heads, layers=mc.layers, latent=latent, n_max=n_max,
                         use_composition=config.cond.composition, use_property=bool(config.cond.property))  # fmt: skip


def init_dit(dit: diffusion.DiT, seed: int):
    """DiT parameters; conditions left out are dropped inside the DiT, which still creates
    their parameters, so one init serves every conditioning."""
    z, mask = jnp.zeros((2, dit.n_max, dit.latent)), jnp.ones((2, dit.n_max), bool)
    return dit.init(jax.random.key(seed), z, jnp.zeros(2, jnp.int32), mask)["params"]


def train_ldm(config, workdir: str):
    mesh = make_mesh(config.mesh.num_devices)
    vmodel, vparams, info = load_vae(config.vae_workdir)
    builder, src, splits, dcfg = load_splits(config, info)
    n_max, latent = vmodel.n_max, vmodel.latent
    mu = encode_split(vmodel, vparams, splits["train"])
    scale = float(1.0 / mu[splits["train"]["mask"]].std())
    counts = np.bincount(splits["train"]["mask"].sum(-1), minlength=n_max + 1).tolist()
    prop_idx = property_index(dcfg, config.cond.property) if config.cond.property else -1
    sched = diffusion.Schedule.linear(config.diffusion.T, config.diffusion.beta_start, config.diffusion.beta_end)
    dit = make_dit(config, latent, n_max)
    meta = {"kind": "crystal_ldm", "latent_scale": scale, "atom_count_histogram": counts, "n_max": n_max,
            "latent": latent, "vae_workdir": os.path.abspath(config.vae_workdir), "model": config.model.to_dict(),
            "cond": config.cond.to_dict(), "diffusion": config.diffusion.to_dict()}  # fmt: skip
    loop.write_json(workdir, "model.json", meta)
    log.info("LDM: latent std %.4g (scale %.4g), atom counts %s", 1 / scale, scale,
             {n: c for n, c in enumerate(counts) if c})  # fmt: skip

    def encode(b):
        m = vmodel.apply({"params": vparams}, b["species"], b["frac"], b["lattice"], b["mask"], method=vmodel.encode)[0]
        cond = {}
        if config.cond.composition:
            cond["composition"] = diffusion.composition(b["species"], b["mask"])
        if prop_idx >= 0:
            cond["prop"] = b["properties"][:, prop_idx]
        return jax.lax.stop_gradient(m) * scale, b["mask"], cond

    def apply(p, z, t, mask, **kw):
        return dit.apply({"params": p}, z, t, mask, **kw)

    params = init_dit(dit, config.train.seed)
    log.info("DiT: %d parameters", sum(x.size for x in jax.tree.leaves(params)))
    loss_fn = diffusion.make_loss(apply, sched, encode, config.cond)
    eval_step = core_step.make_eval_step(loss_fn, mesh)

    def eval_fn(p, step):
        return eval_means(eval_step, p, mesh, splits["validation"], config.train.batch_size, jax.random.key(1))

    it = pipeline(src["train"], config, mesh, config.train.seed)
    state, _ = loop.fit(config, workdir, mesh=mesh, params=params, loss_fn=loss_fn, train_data=it, eval_fn=eval_fn,
                        items_per_step=lambda m: config.train.batch_size, item_name="crystals")  # fmt: skip
    params = jax.device_get(state.params)
    sampler = Sampler(dit, params, sched, vmodel, vparams, scale, counts)
    train_c, test_c = crystals_of(splits["train"]), crystals_of(splits["test"])
    hull = None
    if config.eval.chgnet and jax.process_index() == 0:
        from molgen.crystal import metrics

        cache = os.path.join(builder.data_dir, "chgnet_hull.json")
        hull = metrics.Hull(train_c, cache=cache)
    return evaluate_samples(config, workdir, sampler, train_c, test_c, hull)


class Sampler:
    """Frozen DiT + VAE decoder: atom counts from the training histogram, DDIM (or ancestral)
    latents, decoded crystals."""

    def __init__(self, dit, params, sched, vmodel, vparams, scale, counts):
        self.dit, self.params, self.sched = dit, params, sched
        self.vmodel, self.vparams, self.scale = vmodel, vparams, scale
        self.probs = np.asarray(counts, float) / np.sum(counts)
        self._fns = {}

    def masks(self, rng: np.random.Generator, n: int, atoms: int = 0) -> np.ndarray:
        counts = np.full(n, atoms) if atoms else rng.choice(len(self.probs), size=n, p=self.probs)
        return np.arange(self.vmodel.n_max)[None] < counts[:, None]

    def latents(self, key, mask, *, steps=50, eta=0.0, cond=None, guidance=1.0, ancestral=False):
        sig = (mask.shape, steps, float(eta), tuple(sorted((cond or {}).keys())), float(guidance), ancestral)
        if sig not in self._fns:

            def apply(p, z, t, m, **kw):
                return self.dit.apply({"params": p}, z, t, m, **kw)

            def run(p, vp, key, mask, cond):
                z, lp = diffusion.sample(apply, p, self.sched, key, mask, self.dit.latent, steps=steps, eta=eta,
                                         cond=cond, guidance=guidance, ancestral=ancestral)  # fmt: skip
                out = self.vmodel.apply({"params": vp}, z / self.scale, mask, method=self.vmodel.decode)
                return out, lp

            self._fns[sig] = jax.jit(run)
        return self._fns[sig](self.params, self.vparams, key, jnp.asarray(mask), cond or {})

    def crystals(self, key, mask, **kw):
        out, lp = self.latents(key, mask, **kw)
        return sample.to_crystals(jax.device_get(out), mask), np.asarray(lp)


def load_ldm(workdir: str) -> tuple[Sampler, dict]:
    wd = pathlib.Path(workdir).expanduser()
    if not (wd / "model.json").exists():
        raise FileNotFoundError(f"{workdir!r}: no model.json; train an experiments/crystal_ldm_*.py first")
    info = json.loads((wd / "model.json").read_text())
    vmodel, vparams, _ = load_vae(info["vae_workdir"])
    cfg = ml_collections.ConfigDict({"model": info["model"], "cond": info["cond"]})
    dit = make_dit(cfg, info["latent"], info["n_max"])
    template = jax.eval_shape(lambda: init_dit(dit, 0))
    params = checkpoint.restore_params(os.path.join(wd, "checkpoints"), template)
    d = info["diffusion"]
    sched = diffusion.Schedule.linear(d["T"], d["beta_start"], d["beta_end"])
    return Sampler(dit, params, sched, vmodel, vparams, info["latent_scale"], info["atom_count_histogram"]), info


def draw(sampler: Sampler, sc, n: int, seed: int, cond: dict | None = None, atoms: int = 0):
    """n crystals in batches of sc.batch: (crystals, per-crystal DDIM log-probabilities)."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    crystals, lps = [], []
    for s in range(0, n, sc.batch):
        b = min(sc.batch, n - s)
        mask = sampler.masks(rng, sc.batch, atoms)
        c = {k: jnp.broadcast_to(jnp.asarray(v), (sc.batch, *np.shape(v))) for k, v in (cond or {}).items()}
        cs, lp = sampler.crystals(jax.random.fold_in(key, s), mask, steps=sc.steps, eta=sc.eta, cond=c,
                                  guidance=sc.guidance if c else 1.0)  # fmt: skip
        crystals += cs[:b]
        lps += lp[:b].tolist()
    return crystals, np.asarray(lps)


def evaluate_samples(config, workdir, sampler: Sampler, train_c, test_c, hull) -> dict:
    """Unconditional samples (and, for a property model, samples per target) -> CIFs and metrics.json."""
    from molgen.crystal import metrics

    sc = config.sample
    result = {}
    samples, _ = draw(sampler, sc, sc.n, sc.seed)  # a conditional model: the null conditions
    sample.write_cifs(samples, os.path.join(workdir, "samples", "unconditional"))
    rates, _ = metrics.evaluate(samples, train_c, test_c, hull)
    result["unconditional"] = rates
    log.info("unconditional samples: %s", " ".join(f"{k} {v:.4g}" for k, v in rates.items()))
    if config.cond.property and sc.targets:
        pred_fn, pinfo = load_predictor(config.predictor_workdir) if config.predictor_workdir else (None, None)
        result["property"] = {}
        for target in sc.targets:
            cs, _ = draw(sampler, sc, sc.n_conditional, sc.seed + 1, {"prop": np.float32(target)})
            sample.write_cifs(cs, os.path.join(workdir, "samples", f"{config.cond.property}_{target:g}"))
            entry = {"target": target, "struct_valid": float(metrics.validity(cs)[0].mean())}
            if pred_fn is not None:
                j = pinfo["targets"].index(config.cond.property)
                pred = predict_crystals(pred_fn, cs, sampler.vmodel.n_max)[:, j]
                entry.update(mean_predicted=float(np.nanmean(pred)), std_predicted=float(np.nanstd(pred)))
            result["property"][f"{target:g}"] = entry
            log.info("%s target %g: %s", config.cond.property, target, entry)
    loop.write_json(workdir, "metrics.json", result)
    return result


def predict_crystals(pred_fn, crystals, n_max: int) -> np.ndarray:
    """Predicted properties of decoded crystals (NaN rows for undecodable ones)."""
    from molgen.crystal import data

    ok = [i for i, c in enumerate(crystals) if c is not None and len(c.species) <= n_max]
    out = None
    for s in range(0, len(ok), 256):
        chunk = ok[s : s + 256]
        rows = [data.pad(crystals[i], n_max) for i in chunk]
        b = {k: np.stack([r[k] for r in rows]) for k in ("lattice", "params", "frac", "species", "mask")}
        p = np.asarray(pred_fn(b))
        if out is None:
            out = np.full((len(crystals), p.shape[1]), np.nan)
        out[chunk] = p
    return out if out is not None else np.full((len(crystals), 1), np.nan)


def train_and_evaluate(config, workdir: str):
    fns = {"crystal_vae": train_vae, "crystal_ldm": train_ldm, "crystal_predictor": train_predictor}
    if config.family not in fns:
        raise ValueError(f"config.family={config.family!r} is not a crystal family")
    return fns[config.family](config, workdir)
