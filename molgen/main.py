"""molgen entry point.

    python -m molgen.main --config=experiments/NAME.py --workdir=runs/x [--config.train.lr=3e-4 ...]

Multi-process: pass --coordinator_address/--num_processes/--process_id (launch/local.sh
does), or run under SLURM with several tasks; see molgen.core.distributed.
"""

import importlib
import json
import os
import pathlib
import re

from absl import app, flags
from ml_collections import config_flags

FAMILIES = {
    "lm": "molgen.lm.pretrain",
    "cg": "molgen.cg.train",
    "cg_md": "molgen.cg.production",
    "cg_landscape": "molgen.cg.landscape",
    "cg_relent": "molgen.cg.relent",
    "crystal_vae": "molgen.crystal.train_vae",
    "crystal_ldm": "molgen.crystal.train_ldm",
    "crystal_predictor": "molgen.crystal.train_predictor",
    "crystal_rl": "molgen.crystal.rl",
    "crystal_csp": "molgen.crystal.csp",
    "atomica_pretrain": "molgen.atomica.pretrain",
    "atomica_binding_site": "molgen.atomica.heads",
    "lm_sft": "molgen.lm.sft",
    "lm_rollouts": "molgen.lm.rollouts",
    "lm_grpo": "molgen.lm.grpo",
    "lm_dpo": "molgen.lm.dpo",
}  # config.family -> module with train_and_evaluate(config, workdir)

config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, logs, metrics, checkpoints, plots.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for jax.distributed.")
flags.DEFINE_integer("num_processes", 0, "Number of processes for jax.distributed.")
flags.DEFINE_integer("process_id", -1, "This process's index for jax.distributed.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    from molgen.core import distributed
    from molgen.core import logging as mlog

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds chatter; molgen logs to its own logger

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax

    config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
    if config.family not in FAMILIES:
        raise app.UsageError(f"config.family={config.family!r} is not one of {sorted(FAMILIES)}")
    mlog.setup(workdir)
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    importlib.import_module(FAMILIES[config.family]).train_and_evaluate(config, workdir)
    if jax.process_index() == 0:  # marks a finished run (post-training experiments build missing upstream runs)
        (pathlib.Path(workdir) / "done.json").write_text(json.dumps({"family": config.family}))


def parse_flags(argv):
    """absl flag parsing, with a bad override reported as one clear line instead of a traceback."""
    import sys

    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in a --config.a.b override
        text = str(e.args[0]) if e.args else str(e)
        m = re.search(r'instead of "([^"]+)"', text) or re.search(r"([A-Za-z_]\w*)", text)
        key = m.group(1) if m else text
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
        if not bad:  # not an override: the experiment file itself failed
            sys.exit(f"molgen: the config file raised {type(e).__name__}: {text}")
        hint = re.search(r'Did you mean "[^"]+"', text)
        hint = hint.group(0) + "?" if hint else ""
        sys.exit(f"molgen: unknown config key {key!r} in {' '.join(bad) or 'a --config override'}. {hint}".strip())
    except flags.Error as e:
        sys.exit(f"molgen: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
