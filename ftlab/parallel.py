"""Data parallelism with `jax.sharding`: a 1-D mesh over the devices, params and optimizer
state replicated, each batch split along its first axis. XLA (GSPMD) inserts the gradient
all-reduce; the loss is the same mean over the global batch as on one device.

Multi-host (multi-node SLURM): `initialize()` calls `jax.distributed.initialize()`, which
reads the coordinator, process count and id from SLURM's environment.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ftlab.schema import ConfigError

log = logging.getLogger(__name__)


def initialize() -> bool:
    """Join a multi-process job when SLURM started more than one task; True if joined."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def data_mesh(devices: int | None, batch_size: int) -> jax.sharding.Mesh | None:
    """A ("data",) mesh over `devices` devices (None: all of them); None for one device."""
    have = jax.devices()
    n = len(have) if devices is None else devices
    if n < 1 or n > len(have):
        raise ConfigError("trainer.devices", f"{n} devices asked for, {len(have)} available "
                                             f"({have[0].platform}); use <= {len(have)}")
    if n == 1:
        return None
    if batch_size % n:
        raise ConfigError("trainer.batch_size", f"{batch_size} does not split over {n} "
                                                "devices; use a multiple of trainer.devices")
    # Auto axes: XLA propagates the shardings (GSPMD); explicit axes would make every
    # gather in the model state its output sharding.
    return jax.make_mesh((n,), ("data",), devices=have[:n], axis_types=(AxisType.Auto,))


def replicate(mesh, tree):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(mesh, batch: dict) -> dict:
    """Split every array of a batch along its first axis over the mesh."""
    if mesh is None:
        return batch
    return jax.device_put({k: np.asarray(v) for k, v in batch.items()},
                          NamedSharding(mesh, P("data")))
