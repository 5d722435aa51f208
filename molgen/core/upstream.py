"""Upstream runs: an experiment that starts from another run's workdir (SFT from a pretraining,
an LDM from a VAE, RL from an LDM) builds that run first when it has not finished, so each
experiment runs from a clean checkout."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import time

import jax

log = logging.getLogger("molgen")

_MULTIPROCESS_ENV = ("MOLGEN_COORDINATOR", "MOLGEN_NUM_PROCESSES", "MOLGEN_PROCESS_ID", "SLURM_NTASKS")


def ensure_run(workdir: str, config_file: str, overrides: tuple = (), wait_s: float = 48 * 3600) -> str:
    """Run `python -m molgen.main --config=config_file --workdir=workdir` unless the run has
    finished (`done.json`); an interrupted run resumes. Returns the absolute workdir.

    With several processes, process 0 builds the run (as one process of its own) and the others
    wait until its `done.json` appears (the workdir must be on a filesystem they all see, as
    the parameters they load next are); TimeoutError after `wait_s` seconds."""
    w = pathlib.Path(workdir).expanduser().absolute()
    if (w / "done.json").exists():
        return str(w)
    if not config_file:
        raise FileNotFoundError(f"{w} has no finished run (done.json) and no experiment is configured to build it")
    if jax.process_index() != 0:
        return _wait_for(w, wait_s)
    cmd = [sys.executable, "-m", "molgen.main", f"--config={config_file}", f"--workdir={w}", *overrides]
    env = None
    if jax.process_count() > 1:
        env = {k: v for k, v in os.environ.items() if k not in _MULTIPROCESS_ENV}
    log.info("building the upstream run %s: %s", w, " ".join(cmd))
    res = subprocess.run(cmd, check=False, env=env)
    if res.returncode != 0 or not (w / "done.json").exists():
        raise RuntimeError(f"the upstream run {' '.join(cmd)} failed (exit {res.returncode}); see {w}/log.txt")
    return str(w)


def _wait_for(w: pathlib.Path, wait_s: float, poll_s: float = 10.0) -> str:
    log.info("process %d: waiting for process 0 to build the upstream run %s", jax.process_index(), w)
    deadline = time.monotonic() + wait_s
    while not (w / "done.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"process {jax.process_index()}: the upstream run {w} has no done.json after {wait_s:.0f} s "
                f"of waiting for process 0 to build it (see {w}/log.txt and process 0's log)"
            )
        time.sleep(min(poll_s, wait_s))
    return str(w)
