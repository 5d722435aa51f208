"""Relative-entropy fine-tuning of the chignolin CG model against the all-atom ensemble at 340 K.

python -m molgen.main --config=experiments/cg_chignolin_rem.py --workdir=runs/cg_chignolin_rem
python -m molgen.main --config=experiments/cg_chignolin_md.py:quick --config.md.model_workdir=runs/cg_chignolin_rem \\
    --config.md.dt=2.0 --config.md.record_every=500 --workdir=runs/cg_chignolin_rem_md

`md.model_workdir` (default runs/cg_chignolin) holds the force-matched model (trained by
`md.model_experiment` if missing). molgen.cg.relent takes `train.steps` Adam steps, each on a
batch of `train.batch_size` reference frames (340 K training frames: their forces for force
matching, their positions for the reference average) and `md.copies` x `rem.frames` frames of
persistent CG Langevin chains run with the current parameters (`rem.steps_per_frame` steps
apart). The result is a trained model: the landscape experiment and the export take its workdir.
quick (default): 150 steps, about 15 minutes on 2 cores; tiny: a minute, for tests.
"""

import ml_collections

from configs import common


def get_config(variant: str = "quick"):
    variant = common.check_variant(variant, ("quick", "full", "tiny"))
    tiny = variant == "tiny"
    cfg = common.base("cg_relent")
    cfg.md = ml_collections.ConfigDict(
        dict(
            model_workdir="runs/cg_chignolin",
            model_experiment="experiments.cg_chignolin:quick",  # trained into model_workdir if missing
            temperature=340,
            dt=2.0,  # fs
            damp=500.0,  # fs, Langevin damping time
            copies=4 if tiny else 32,  # half from the folded structure, half from unfolded reference frames
            unfolded_above=3.0,  # Å CA RMSD: the unfolded reference frames the odd copies start from
            seed=0,
        )
    )
    cfg.rem = ml_collections.ConfigDict(
        dict(
            burn_in_steps=50 if tiny else 5000,  # with the base model, before the first update
            steps_per_frame=20 if tiny else 250,  # MD steps between CG frames (0.5 ps)
            frames=2,  # CG frames per chain per update: copies x frames CG frames per step
            fm_weight=1.0,  # force matching (per force component) ...
            rem_weight=1.0,  # ... plus beta (<U>_ref - <U>_CG)
        )
    )
    cfg.optim = common.optim(name="adamw", lr=3e-4, weight_decay=0.0, schedule="constant", clip_norm=0.0)
    cfg.train = common.train(steps=3 if tiny else 1500 if variant == "full" else 150, batch_size=8 if tiny else 64,
                             log_every=1 if tiny else 10, eval_every=0)  # fmt: skip
    cfg.ckpt = common.ckpt(every_steps=3 if tiny else 50, best_metric="", keep_best=0)
    return cfg
