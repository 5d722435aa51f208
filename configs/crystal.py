"""Config groups of the crystal family: the two datasets here, the VAE, the LDM and the predictor."""

import os

import ml_collections

from configs import common

# Shipped with the repository (third_party/data/crystals/SOURCE.md: origin, licence, checksums).
CRYSTALS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "third_party", "data", "crystals"))
DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "molgen", "tfds")

# dataset name -> data group. perov_5 ships only val and test here: both are pooled and split
# 80/10/10 with seed 0 (resplit). The MP-20 subset keeps its own train/val/test files; full
# MP-20 drops in by pointing data.source at its folder.
DATASETS = {
    "perov": dict(source=os.path.join(CRYSTALS, "perov_5"), properties=("heat_ref", "dir_gap"), resplit=(0.1, 0.1)),
    "mp20": dict(
        source=os.path.join(CRYSTALS, "mp_20_subset"),
        properties=("band_gap", "formation_energy_per_atom", "e_above_hull"),
        resplit=(),
    ),
}


def data(dataset: str) -> ml_collections.ConfigDict:
    if dataset not in DATASETS:
        raise ValueError(f"unknown crystal dataset {dataset!r}; use one of {sorted(DATASETS)}")
    return ml_collections.ConfigDict(dict(data_dir=DATA_DIR, n_max=0, seed=0, **DATASETS[dataset]))


def vae(dataset: str, variant: str) -> ml_collections.ConfigDict:
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    cfg = common.base("crystal_vae")
    cfg.data = data(dataset)
    cfg.model = ml_collections.ConfigDict(dict(dim=128, heads=4, enc_layers=3, dec_layers=3, latent=8, n_fourier=4))
    cfg.loss = ml_collections.ConfigDict(dict(species=1.0, lengths=1.0, angles=10.0, coords=10.0, kl=1e-5))
    cfg.augment = ml_collections.ConfigDict(dict(rotate=True, translate=True))
    cfg.eval = ml_collections.ConfigDict(dict(match_n=200, test_n=0))
    cfg.optim = common.optim(
        name="adamw", lr=5e-4, weight_decay=0.0, b2=0.99, schedule="warmup_cosine", final_lr_frac=0.02, warmup_steps=200
    )
    steps = {"tiny": 4, "quick": 3000, "full": 30000}[variant]
    cfg.train = common.train(steps=steps, batch_size=64, log_every=100, eval_every=1000, seed=0)
    cfg.ckpt = common.ckpt(every_steps=1000, best_metric="eval/loss")
    if variant == "tiny":
        cfg.model.update(dict(dim=32, heads=2, enc_layers=1, dec_layers=1))
        cfg.train.update(dict(batch_size=8, log_every=1, eval_every=2))
        cfg.ckpt.every_steps = 2
        cfg.eval.update(dict(match_n=8, test_n=8))
    return cfg


def ldm(dataset: str, variant: str) -> ml_collections.ConfigDict:
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    cfg = common.base("crystal_ldm")
    cfg.vae_workdir = f"runs/crystal_vae_{dataset}"
    cfg.predictor_workdir = ""  # a crystal_predictor run: predicted property of conditional samples
    cfg.data_dir = DATA_DIR
    cfg.model = ml_collections.ConfigDict(dict(dim=192, heads=6, layers=4))
    cfg.diffusion = ml_collections.ConfigDict(dict(T=1000, beta_start=1e-4, beta_end=0.02))
    # MP-20: band-gap conditioned (classifier-free guidance; the null condition gives the
    # unconditional samples); the predictor run scores the conditional samples
    cfg.cond = ml_collections.ConfigDict(
        dict(composition=False, property="band_gap" if dataset == "mp20" else "", drop=0.2)
    )
    if dataset == "mp20":
        cfg.predictor_workdir = "runs/crystal_predictor_mp20"
    cfg.sample = ml_collections.ConfigDict(
        dict(n=500, n_conditional=200, batch=500, steps=50, eta=0.0, guidance=2.0, seed=0, targets=(0.0, 3.0))
    )
    cfg.eval = ml_collections.ConfigDict(dict(chgnet=True))
    cfg.optim = common.optim(name="adamw", lr=3e-4, weight_decay=0.0, b2=0.99, schedule="warmup_cosine",
                             warmup_steps=500, final_lr_frac=0.02)  # fmt: skip
    steps = {"tiny": 4, "quick": 5000, "full": 50000}[variant]
    cfg.train = common.train(steps=steps, batch_size=128, log_every=200, eval_every=1000, seed=0)
    cfg.ckpt = common.ckpt(every_steps=1000, best_metric="eval/loss")
    if variant == "full":
        cfg.model.update(dict(dim=256, heads=8, layers=6))
    if dataset == "mp20" and variant != "tiny":  # 847 crystals of up to 20 atoms: smaller batches
        cfg.train.batch_size = 64
        cfg.train.steps = {"quick": 3000, "full": 30000}[variant]
    if variant == "tiny":
        cfg.model.update(dict(dim=32, heads=2, layers=1))
        cfg.train.update(dict(batch_size=8, log_every=1, eval_every=2))
        cfg.ckpt.every_steps = 2
        cfg.sample.update(dict(n=4, n_conditional=4, batch=4, steps=5))
        cfg.eval.chgnet = False
    return cfg


def predictor(dataset: str, variant: str) -> ml_collections.ConfigDict:
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    cfg = common.base("crystal_predictor")
    cfg.vae_workdir = f"runs/crystal_vae_{dataset}"
    cfg.data_dir = DATA_DIR
    cfg.targets = {"perov": ("heat_ref", "dir_gap"), "mp20": ("band_gap", "formation_energy_per_atom")}[dataset]
    cfg.model = ml_collections.ConfigDict(dict(hidden=(256, 256)))
    cfg.optim = common.optim(name="adamw", lr=1e-3, weight_decay=1e-4, b2=0.99, schedule="warmup_cosine",
                             warmup_steps=100, final_lr_frac=0.02)  # fmt: skip
    steps = {"tiny": 4, "quick": 3000, "full": 20000}[variant]
    cfg.train = common.train(steps=steps, batch_size=64, log_every=200, eval_every=1000, seed=0)
    cfg.ckpt = common.ckpt(every_steps=1000, best_metric="eval/loss")
    if variant == "tiny":
        cfg.model.hidden = (16,)
        cfg.train.update(dict(batch_size=8, log_every=1, eval_every=2))
        cfg.ckpt.every_steps = 2
    return cfg
