"""What the crystal trainers share (train_vae, train_ldm, train_predictor): the dataset build and
its Grain pipeline, host batches over a split, the VAE's construction and loading from a finished
VAE workdir, and the splits of that VAE's dataset.
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

from molgen.core import checkpoint, loop
from molgen.core import step as core_step
from molgen.crystal import vae

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


# ----------------------------------------------------------------------------- shared VAE pieces


def vae_info(workdir: str) -> dict:
    """model.json of a finished VAE workdir (what its data splits need), without its parameters."""
    wd = pathlib.Path(workdir).expanduser()
    if not (wd / "model.json").exists():
        raise FileNotFoundError(
            f"vae_workdir={workdir!r}: no model.json; train it first with an experiments/crystal_vae_*.py config"
        )
    info = json.loads((wd / "model.json").read_text())
    if info.get("kind") != "crystal_vae":
        raise ValueError(f"vae_workdir={workdir!r}: model.json is a {info.get('kind')!r}, not a crystal_vae")
    return info


def load_vae(workdir: str):
    """(model, params, model.json) of a finished VAE workdir."""
    wd = pathlib.Path(workdir).expanduser()
    info = vae_info(workdir)
    mc = ml_collections.ConfigDict(
        {k: info[k] for k in ("dim", "heads", "enc_layers", "dec_layers", "latent", "n_fourier")}
    )
    model = make_vae(mc, info["n_max"])
    template = jax.eval_shape(lambda: init_vae(model, 0, example_batch(info["n_max"])))
    params = checkpoint.restore_params(os.path.join(wd, "checkpoints"), template)
    return model, params, info


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
