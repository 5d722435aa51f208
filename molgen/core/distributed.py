"""Distributed start-up and the device mesh.

Three ways to start, checked in this order:
1. explicit `coordinator_address`, `num_processes`, `process_id` (flags of molgen.main, or
   the MOLGEN_COORDINATOR / MOLGEN_NUM_PROCESSES / MOLGEN_PROCESS_ID environment that
   launch/local.sh sets);
2. a SLURM job step with more than one task (SLURM_NTASKS > 1): jax.distributed reads
   the coordinator and ranks from the SLURM environment;
3. otherwise a single process.
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger("molgen")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    coordinator_address = coordinator_address or os.environ.get("MOLGEN_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("MOLGEN_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("MOLGEN_PROCESS_ID", "-1"))
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not coordinator_address and not slurm:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} needs num_processes>0 and "
                f"0<=process_id<num_processes (got {num_processes}, {process_id})"
            )
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()  # SLURM cluster auto-detection
    log.info(
        "process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """1-D "data" mesh over the first `num_devices` global devices (0: all)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices) or len(devices) % n:
        raise ValueError(f"mesh.num_devices={n} does not divide the {len(devices)} available devices")
    return jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))
