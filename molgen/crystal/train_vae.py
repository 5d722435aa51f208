"""Training entry point of crystal_vae (config.family): the crystal VAE trained on the shared
runtime (core.loop.fit: the shard_map step, Orbax checkpoints with resume, metric writers, NaN
guard), with its reconstruction (StructureMatcher) evaluation written into the workdir.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from molgen.chem import crystal as xtal
from molgen.core import loop
from molgen.core import step as core_step
from molgen.core.distributed import make_mesh
from molgen.crystal import structures, vae
from molgen.crystal.common import batches, build_data, eval_means, init_vae, make_vae, pipeline

log = logging.getLogger("molgen")


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
        preds = structures.to_crystals(out, b["mask"])
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


def train_and_evaluate(config, workdir: str):
    return train_vae(config, workdir)
