"""Training entry point of crystal_ldm (config.family): a DiT over the latents of a finished VAE
workdir (`config.vae_workdir`), trained on the shared runtime (core.loop.fit), with its samples
(CIFs) and their metrics written into the workdir; and the sampler of a trained LDM (Sampler,
load_ldm, draw) that molgen.crystal.sample and benchmarks/crystal_sampling.py use.
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

from molgen.core import checkpoint, loop
from molgen.core import step as core_step
from molgen.core.distributed import make_mesh
from molgen.core.upstream import ensure_run
from molgen.crystal import diffusion, structures
from molgen.crystal.common import batches, crystals_of, eval_means, load_splits, load_vae, pipeline, property_index
from molgen.crystal.train_predictor import load_predictor, predict_crystals

log = logging.getLogger("molgen")


def encode_split(model, params, split, batch: int = 512) -> np.ndarray:
    """Posterior means (n, N, latent) of a whole split, zero on padded atoms."""
    run = jax.jit(lambda p, b: model.apply({"params": p}, b["species"], b["frac"], b["lattice"], b["mask"],
                                           method=model.encode)[0])  # fmt: skip
    out = [np.asarray(run(params, b))[:real] for b, real in batches(split, batch)]
    return np.concatenate(out)


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
    vmodel, vparams, info = load_vae(ensure_run(config.vae_workdir, config.vae_config))
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
        return structures.to_crystals(jax.device_get(out), mask), np.asarray(lp)


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
    structures.write_cifs(samples, os.path.join(workdir, "samples", "unconditional"))
    rates, _ = metrics.evaluate(samples, train_c, test_c, hull)
    result["unconditional"] = rates
    log.info("unconditional samples: %s", " ".join(f"{k} {v:.4g}" for k, v in rates.items()))
    if config.cond.property and sc.targets:
        pw = config.predictor_workdir and ensure_run(config.predictor_workdir, config.predictor_config)
        pred_fn, pinfo = load_predictor(pw) if pw else (None, None)
        result["property"] = {}
        for target in sc.targets:
            cs, _ = draw(sampler, sc, sc.n_conditional, sc.seed + 1, {"prop": np.float32(target)})
            structures.write_cifs(cs, os.path.join(workdir, "samples", f"{config.cond.property}_{target:g}"))
            entry = {"target": target, "struct_valid": float(metrics.validity(cs)[0].mean())}
            if pred_fn is not None:
                j = pinfo["targets"].index(config.cond.property)
                pred = predict_crystals(pred_fn, cs, sampler.vmodel.n_max)[:, j]
                entry.update(mean_predicted=float(np.nanmean(pred)), std_predicted=float(np.nanstd(pred)))
            result["property"][f"{target:g}"] = entry
            log.info("%s target %g: %s", config.cond.property, target, entry)
    loop.write_json(workdir, "metrics.json", result)
    return result


def train_and_evaluate(config, workdir: str):
    return train_ldm(config, workdir)
