"""Training entry point of crystal_predictor (config.family): an MLP on the frozen features of a
finished VAE workdir (`config.vae_workdir`), trained on the shared runtime (core.loop.fit), with
its test MAE written into the workdir; and the loaded predictor that scores decoded crystals.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from molgen.core import checkpoint, loop
from molgen.core.distributed import make_mesh
from molgen.core.upstream import ensure_run
from molgen.crystal import vae
from molgen.crystal.common import batches, example_batch, load_splits, load_vae, pipeline, property_index

log = logging.getLogger("molgen")


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
    vmodel, vparams, info = load_vae(ensure_run(config.vae_workdir, config.vae_config))
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
    return train_predictor(config, workdir)
