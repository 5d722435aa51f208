"""A language-model run as a policy for post-training: its model, text codec and parameters.

Every LM run writes `model_config.json`; post-training runs also write `policy.json`
(`{"positions": ..., "codec": ...}`); for a pretraining run these come from its
`config.json` (`data.positions`, molecular codec). `ensure_run` builds a missing upstream run
(e.g. the quickstart pretraining) by running its experiment, so each post-training
experiment can start from a clean checkout; `load_upstream` is the start of SFT, rollouts,
GRPO and DPO (their `config.policy`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax

from molgen.core import checkpoint
from molgen.core.upstream import ensure_run
from molgen.lm.model import Qwen3Config

log = logging.getLogger("molgen")


@dataclasses.dataclass(frozen=True)
class Policy:
    workdir: str
    model: Qwen3Config
    positions: str
    codec: str


def load_policy(workdir: str) -> Policy:
    """The model config, position mode and codec of an LM run (a missing file is named)."""
    w = pathlib.Path(workdir).expanduser().absolute()
    mc = w / "model_config.json"
    if not mc.exists():
        raise FileNotFoundError(f"{mc} not found: {workdir!r} is not a molgen LM run (or it has not started)")
    model = Qwen3Config(**json.loads(mc.read_text()))
    pj = w / "policy.json"
    if pj.exists():
        d = json.loads(pj.read_text())
        return Policy(str(w), model, d["positions"], d["codec"])
    cfg = json.loads((w / "config.json").read_text())
    return Policy(str(w), model, cfg.get("data", {}).get("positions", "sequential"), "molecular")


def write_policy(workdir: str, policy_model: Qwen3Config, positions: str, codec: str) -> None:
    w = pathlib.Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    (w / "model_config.json").write_text(json.dumps(dataclasses.asdict(policy_model), indent=2))
    (w / "policy.json").write_text(json.dumps({"positions": positions, "codec": codec}, indent=2))


def load_params(policy: Policy, abstract_params):
    return checkpoint.restore_params(policy.workdir, abstract_params)


def load_upstream(config, workdir: str = "") -> tuple[Policy, dict]:
    """The policy of `config.policy.workdir` (built first from `config.policy.build_config` when it
    has not finished) and its parameters; with `workdir`, also recorded there (model_config.json,
    policy.json), so that the new run is a policy itself."""
    from molgen.lm.pretrain import init_params

    pol = load_policy(ensure_run(config.policy.workdir, config.policy.build_config))
    if workdir:
        write_policy(workdir, pol.model, pol.positions, pol.codec)
    return pol, load_params(pol, jax.eval_shape(lambda: init_params(pol.model, 0)))


# the launch variables of molgen.core.distributed: the build runs as a single process
