"""A language-model run as a policy for post-training: its model, text codec and parameters.

Every LM run writes `model_config.json`; post-training runs also write `policy.json`
(`{"positions": ..., "codec": ...}`); for a pretraining run these come from its
`config.json` (`data.positions`, molecular codec). `ensure_run` builds a missing upstream run
(e.g. the quickstart pretraining) by running its experiment, so each post-training
experiment can start from a clean checkout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import subprocess
import sys

from molgen.core import checkpoint
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


def ensure_run(workdir: str, config_file: str, overrides: tuple = ()) -> str:
    """Run `python -m molgen.main --config=config_file --workdir=workdir` unless the run has
    finished (`done.json`); an interrupted run resumes. Returns the absolute workdir."""
    w = pathlib.Path(workdir).expanduser().absolute()
    if (w / "done.json").exists():
        return str(w)
    if not config_file:
        raise FileNotFoundError(f"{w} has no finished run (done.json) and no experiment is configured to build it")
    cmd = [sys.executable, "-m", "molgen.main", f"--config={config_file}", f"--workdir={w}", *overrides]
    log.info("building the upstream run %s: %s", w, " ".join(cmd))
    res = subprocess.run(cmd, check=False)
    if res.returncode != 0 or not (w / "done.json").exists():
        raise RuntimeError(f"the upstream run {' '.join(cmd)} failed (exit {res.returncode}); see {w}/log.txt")
    return str(w)
