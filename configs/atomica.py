"""Config groups of the interaction family (ATOMICA): data, model, pretraining."""

import os

import ml_collections

from configs import common

COMPLEXES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "third_party", "data", "complexes"))
DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "molgen", "tfds")


def data() -> ml_collections.ConfigDict:
    """The shipped complexes (third_party/data/complexes/SOURCE.md): Docking Benchmark 5 bound
    pairs and PDB entries with ligands, ions and nucleic acids."""
    sources = (os.path.join(COMPLEXES, "plip_pdb"), os.path.join(COMPLEXES, "bm5_bound"))
    return ml_collections.ConfigDict(dict(sources=sources, cutoff=8.0, max_blocks=256, fractions=(0.1, 0.15), seed=0,
                                          data_dir=DATA_DIR))  # fmt: skip


def model(tp: str = "fully_connected") -> ml_collections.ConfigDict:
    """ATOMICA's sizes: hidden 32, 4 layers per level, 4 heads, 4 pooling attention layers.
    rigid_head: the pretraining's contact term of the translation and rotation scores, "forces"
    or "lsq" (molgen.atomica.model.Pretrainer; docs/atomica.md, run D)."""
    return ml_collections.ConfigDict(dict(hidden=32, layers=4, heads=4, pool_layers=4, tp=tp, rigid_head="forces"))


def pretrain(variant: str) -> ml_collections.ConfigDict:
    """ATOMICA's pretraining (scripts/pretrain.sh): Adam lr 1e-4, weight decay 1e-3, loss weights
    1 / 0.1 / 1 / 1, 10% of blocks masked. quick: the depthwise tensor product, interfaces cropped
    to 96 blocks, lr 2e-3 with warm-up and cosine decay, sized for 20 minutes on 2 CPU cores; full: the faithful
    fully-connected tensor product at lr 1e-4."""
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    cfg = common.base("atomica_pretrain")
    cfg.data = data()
    cfg.model = model("depthwise" if variant in ("quick", "tiny") else "fully_connected")
    cfg.noise = ml_collections.ConfigDict(dict(mask_ratio=0.1))
    # padding: level 0 of the capacity ladder is sized from this many prepared training items
    cfg.capacity = ml_collections.ConfigDict(dict(sample=32))
    cfg.eval = ml_collections.ConfigDict(dict(batch=8, seed=0, max_items=0))  # max_items: per split, 0 = all
    if variant == "full":
        cfg.optim = common.optim(name="adamw", lr=1e-4, weight_decay=1e-3, b2=0.999, clip_norm=0.0,
                                 schedule="constant", warmup_steps=0)  # fmt: skip
        cfg.train = common.train(steps=50000, batch_size=8, log_every=100, eval_every=2500, seed=0)
    else:
        cfg.optim = common.optim(name="adamw", lr=2e-3, weight_decay=1e-3, b2=0.999, clip_norm=1.0,
                                 schedule="warmup_cosine", warmup_steps=30, final_lr_frac=0.05)  # fmt: skip
        cfg.train = common.train(steps=250, batch_size=4, log_every=20, eval_every=250, seed=0)
        cfg.data.max_blocks = 96  # 3 epochs in 20 CPU minutes (ATOMICA crops at 256)
    cfg.ckpt = common.ckpt(every_steps=100, keep=2, best_metric="eval/loss")
    if variant == "tiny":
        cfg.model.update(dict(hidden=8, layers=2, pool_layers=1))
        cfg.train.update(dict(steps=4, batch_size=4, log_every=1, eval_every=4))
        cfg.eval.max_items = 4
        cfg.ckpt.every_steps = 2
    return cfg


def binding_site(variant: str) -> ml_collections.ConfigDict:
    """Per-residue binding sites (molgen.atomica.heads): the pretrained encoder fine-tuned with a
    residue head, beside the same model from a random encoder and a logistic regression on
    residue type and solvent accessibility, all on one split."""
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    pre = pretrain(variant)
    cfg = common.base("atomica_binding_site")
    cfg.data = data()
    cfg.model = pre.model
    cfg.capacity = pre.capacity
    suffix = "" if variant == "quick" else f"_{variant}"
    cfg.pretrain_workdir = f"runs/atomica_pretrain{suffix}"
    cfg.pretrain_config = "experiments/atomica_pretrain.py" + ("" if variant == "quick" else f":{variant}")
    # quick: frozen encoders and a linear probe over (nearly) whole proteins (patch 512 residues)
    # on every training protein (max_train 0; 150 halves the time but the probe then does not
    # beat the logistic baseline, docs/atomica.md); full: fine-tuning on patches of 128 residues.
    frozen = variant in ("quick", "tiny")
    cfg.site = ml_collections.ConfigDict(dict(mode="frozen" if frozen else "finetune", patch=512 if frozen else 128,
                                              eval_batch=2 if frozen else 4, bootstrap=1000, C=1.0,
                                              max_train=0))  # fmt: skip
    cfg.optim = common.optim(name="adamw", lr=5e-4, weight_decay=1e-3, b2=0.999, clip_norm=1.0,
                             schedule="warmup_cosine", warmup_steps=20, final_lr_frac=0.05)  # fmt: skip
    steps = {"quick": 300, "full": 3000, "tiny": 2}[variant]
    cfg.train = common.train(steps=steps, batch_size=4, log_every=20, eval_every=max(steps // 3, 1), seed=0)
    cfg.ckpt = common.ckpt(every_steps=100, keep=2, best_metric="eval/auroc", best_mode="max")
    if variant == "tiny":
        cfg.site.update(dict(patch=16, bootstrap=20, max_train=6))
        cfg.train.log_every = 1
        cfg.ckpt.every_steps = 2
    return cfg
