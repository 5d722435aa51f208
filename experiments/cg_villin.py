"""CG force field of villin HP36: simulate (or reuse), coarse-grain, fit priors, train, evaluate.

python -m molgen.main --config=experiments/cg_villin.py --workdir=runs/cg_villin
python -m molgen.main --config=experiments/cg_villin.py:full --workdir=runs/cg_villin_full

python -m molgen.main --config=experiments/cg_villin.py:medium --workdir=runs/cg_villin_medium

The quick variant (default) fits in 20 minutes on a 2-core CPU, simulation included the first
time (the data go to ~/.cache/molgen/cg/villin_quick and are reused). The full variant
simulates more frames and temperatures and trains longer with a 3-seed ensemble. The medium
variant trains the quick model for 12 epochs on the full variant's data (one seed): about
half an hour once those data exist.

Bead forces come from the optimised force map (`data.force_map=optimized`, molgen/cg/forcemap.py),
fitted on the train frames: 7.7x less noise than residue sums on villin. `--config.data.force_map=sum`
gives the plain residue sums.
"""

import os

import ml_collections

from configs import common

CACHE = os.path.join(os.environ.get("MOLGEN_CACHE", os.path.expanduser("~/.cache/molgen")))


def stage(name, lr, epochs, schedule, warmup_steps=0, **kw):
    opt = common.optim(name=name, lr=lr, schedule=schedule, warmup_steps=warmup_steps, weight_decay=0.0,
                       b1=0.9, b2=0.999, clip_norm=10.0, final_lr_frac=0.01, **kw)  # fmt: skip
    return ml_collections.ConfigDict(
        dict(enabled=True, optim=opt, epochs=epochs, eval_every_epochs=1, ckpt_every_epochs=1)
    )


def get_config(variant: str = "quick"):
    medium = common.check_variant(variant, ("quick", "medium", "full")) == "medium"
    if medium:
        cfg = get_config("quick")
        cfg.data.source = os.path.join(CACHE, "cg", "villin_full")
        cfg.data.simulate.update(get_config("full").data.simulate.to_dict())
        cfg.stages.stage1.epochs, cfg.stages.stage2.epochs = 10, 2
        return cfg
    quick = variant == "quick"
    cfg = common.base("cg")
    cfg.data = ml_collections.ConfigDict(
        dict(
            source=os.path.join(CACHE, "cg", f"villin_{variant}"),
            data_dir=os.path.join(CACHE, "tfds"),
            n_max=0,
            split="frame",
            test_domains=(),
            val_fraction=0.1,
            test_fraction=0.2,
            on_nan="error",
            seed=0,
            force_map="optimized",  # molgen.cg.forcemap, fitted on the train frames; "sum": residue sums;
            # "stored": the bead forces of CA-mapped files (molgen.cg.mapped)
            force_map_window=1,
            extra_train="",  # comma-separated folders of frames for the train split only (molgen.cg.active)
            temperatures=(),  # K: train and test on runs at these temperatures only (empty: all)
            simulate=dict(
                enabled=True,
                domain="villin",
                pdb="",
                temperatures=(320, 348) if quick else (320, 348, 379),
                replicas=2 if quick else 3,
                frames=150 if quick else 1000,
                steps_per_frame=10,
                equilibration_steps=500,
                seed=0,
            ),
        )
    )
    cfg.model = ml_collections.ConfigDict(
        dict(
            cutoff=12.0,
            n_basis=24,
            n_layers=3 if quick else 4,
            latent=32 if quick else 64,
            channels=4 if quick else 8,
            lmax=2,
            embed=8 if quick else 16,
            mlp_depth=2,
            avg_neighbors=20.0,
            capacity_multiplier=1.2,
            box=0.0,  # cubic periodic box edge in Å; 0 = free space (implicit solvent, mdCATH CA frames)
            inner_cutoff=-1.0,  # Å; Allegro fades out shorter edges. -1: data's shortest pair + inner_width; 0: off
            inner_width=1.0,
            env_norm="count",  # environments as weighted means: bounded energies under compaction
        )  # fmt: skip
    )
    if not quick:
        cfg.model.n_basis = 36
    cfg.priors = ml_collections.ConfigDict(
        dict(
            temperature=0,
            n_angle=6,
            n_dihedral=4,
            bins=60,
            tail_quantile=0.005,
            wall_power=4.0,  # power of the repulsive, excluded-volume and angle walls (molgen.cg.priors)
            ridge=1e-3,  # keeps the Fourier fits over a narrow angle range well conditioned
            excluded_volume=True,
            weights=dict(bond=0.5, angle=0.25, dihedral=0.25, repulsive=1.0, excluded=1.0),
        )  # fmt: skip
    )
    # extra_weight: loss weight of data.extra_train frames (each is one of `samples` at one configuration)
    cfg.loss = ml_collections.ConfigDict(dict(gamma_f=1.0, gamma_u=0.0, extra_weight=1.0))
    cfg.stages = ml_collections.ConfigDict(
        dict(
            # the walls (repulsive, excluded) keep their Boltzmann-inversion fit: see train.lbfgs_priors
            lbfgs=dict(enabled=True, iterations=50, frames=256, terms=("bond", "angle", "dihedral")),
            stage1=stage("adabelief", 3e-3, 20 if quick else 100, "warmup_cosine", warmup_steps=20),
            stage2=stage("yogi", 3e-4, 3 if quick else 20, "constant"),
        )
    )
    # seeds train one after another (each with its own data order), or with vmap=True as one
    # stacked run (same batches, per-member optimiser state; faster on accelerators)
    cfg.ensemble = ml_collections.ConfigDict(dict(seeds=1 if quick else 3, vmap=False))
    cfg.eval = ml_collections.ConfigDict(
        dict(
            noise_floor=dict(  # fixed-CA MD at test frames: the error no CG model can remove
                enabled=True,
                configs_per_temperature=3 if quick else 20,
                samples=24 if quick else 100,
                steps_per_sample=10,
                equilibration_steps=200,
                seed=0,
            )
        )
    )
    cfg.train = common.train(batch_size=16, log_every=20, seed=0)
    cfg.ckpt = common.ckpt(best_metric="eval/force_mse", keep=2)
    return cfg
