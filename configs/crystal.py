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


def upstream_config(model: str, dataset: str, variant: str) -> str:
    """The experiment that builds a missing upstream run (core.upstream.ensure_run); the same
    variant, so a quick LDM builds a quick VAE. Empty (`--config.vae_config=`): never build."""
    return f"experiments/crystal_{model}_{dataset}.py" + ("" if variant == "quick" else f":{variant}")


def upstream_workdir(model: str, dataset: str, variant: str) -> str:
    """runs/crystal_MODEL_DATASET for quick, with a _full or _tiny suffix otherwise (a tiny test
    run never lands where a quick run would look)."""
    return f"runs/crystal_{model}_{dataset}" + ("" if variant == "quick" else f"_{variant}")


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
    cfg.vae_workdir = upstream_workdir("vae", dataset, variant)
    cfg.vae_config = upstream_config("vae", dataset, variant)  # builds vae_workdir when it has not finished
    cfg.predictor_workdir = ""  # a crystal_predictor run: predicted property of conditional samples
    cfg.data_dir = DATA_DIR
    cfg.model = ml_collections.ConfigDict(dict(dim=192, heads=6, layers=4))
    cfg.diffusion = ml_collections.ConfigDict(dict(T=1000, beta_start=1e-4, beta_end=0.02))
    # MP-20: band-gap conditioned (classifier-free guidance; the null condition gives the
    # unconditional samples); the predictor run scores the conditional samples
    cfg.cond = ml_collections.ConfigDict(
        dict(composition=False, property="band_gap" if dataset == "mp20" else "", drop=0.2)
    )
    cfg.predictor_config = ""
    if dataset == "mp20":
        cfg.predictor_workdir = upstream_workdir("predictor", dataset, variant)
        cfg.predictor_config = upstream_config("predictor", dataset, variant)
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
    cfg.vae_workdir = upstream_workdir("vae", dataset, variant)
    cfg.vae_config = upstream_config("vae", dataset, variant)
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


def rl(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """GRPO over the LDM's DDIM chain with the de-novo reward (molgen.crystal.rl; Chemeleon2's
    rl_module.yaml and mp_20/rl_dng.yaml: 5 prompts x 64 samples, clip 1e-3, k3 KL 1 to the
    rollout policy, entropy 1e-5, two minibatches, AdamW lr 1e-5, gradient clip 1)."""
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    cfg = common.base("crystal_rl")
    cfg.ldm_workdir = upstream_workdir("ldm", dataset, variant)
    cfg.ldm_config = upstream_config("ldm", dataset, variant)
    cfg.data_dir = DATA_DIR
    cfg.rl = ml_collections.ConfigDict(
        dict(
            prompts_per_step=5,
            group_size=64,
            steps=50,
            eta=1.0,
            reduce="mean",
            clip=1e-3,
            kl=1.0,
            entropy=1e-5,
            minibatches=2,
            zero_std=1e-4,
        )  # fmt: skip
    )
    cfg.reward = ml_collections.ConfigDict(
        dict(
            weights=dict(creativity=1.0, energy=1.0, structure_diversity=0.1, composition_diversity=1.0),
            hull_supported_only=False,  # True: a sample whose system holds no training compound scores E_hull 1
            energy_clip=1.0,  # eV/atom: -clip(E_hull, 0, energy_clip) (Chemeleon2: 1)
            ref_features=50000,  # training crystals drawn for the diversity reference (all when fewer)
        )
    )
    cfg.eval = ml_collections.ConfigDict(dict(n=1000, batch=500, steps=50, etas=(1.0, 0.0), seed=1234, chgnet=True))
    cfg.optim = common.optim(name="adamw", lr=1e-5, weight_decay=0.0, schedule="constant", warmup_steps=0,
                             clip_norm=1.0)  # fmt: skip
    if dataset == "mp20":
        # The subset's LDM samples sit ~9 eV/atom above the hull: Chemeleon2's clip at 1 gives
        # every sample -1 and no signal, a clip at 10 does (docs/crystal.md, MP-20 subset RL).
        cfg.reward.energy_clip = 10.0
    steps = {"tiny": 4, "quick": 40, "full": 1000}[variant]
    cfg.train = common.train(steps=steps, batch_size=cfg.rl.prompts_per_step, log_every=1, eval_every=steps, seed=0)
    cfg.ckpt = common.ckpt(every_steps=10, keep=2, best_metric="")
    if variant == "tiny":
        cfg.rl.update(dict(prompts_per_step=4, group_size=2, steps=5))  # 4 prompts: the tests' 4 fake devices
        cfg.train.batch_size = 4
        cfg.ckpt.every_steps = 2
        cfg.reward.weights.energy = 0.0  # no CHGNet in the tiny test (the hull has its own tests)
        cfg.eval.update(dict(n=8, batch=8, steps=5, chgnet=False))
    return cfg


def csp(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """Crystal structure prediction (molgen.crystal.csp): the LDM of `ldm()` conditioned on
    composition only (classifier-free guidance, drop 0.2, scale 2), then `csp.k` samples for each
    test composition, scored by StructureMatcher against the test crystal (DiffCSP's protocol)."""
    cfg = ldm(dataset, variant)
    cfg.family = "crystal_csp"
    cfg.cond.update(dict(composition=True, property=""))
    cfg.predictor_workdir, cfg.predictor_config = "", ""
    cfg.sample.update(dict(n=200, targets=()))
    cfg.csp = ml_collections.ConfigDict(dict(k=20, seed=0, steps=50, eta=0.0, guidance=2.0, batch=500, n_test=0))
    if variant == "tiny":
        cfg.csp.update(dict(k=2, steps=5, batch=8, n_test=4))
    return cfg
