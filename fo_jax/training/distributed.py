"""Multi-process start-up and global batches: JAX's own runtime is the distributed engine.

On a TPU pod or a GPU cluster every process runs the same program; ``initialize`` joins them
(``jax.distributed.initialize``), after which ``jax.devices()`` spans all hosts and one mesh covers
them. Each process loads its own slice of the data; ``global_batch`` stitches the slices into one
global array sharded over the mesh's batch axes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the other processes of this job, if it has any. Returns whether it is multi-process.

    Explicit arguments (or ``FO_JAX_COORDINATOR``, ``FO_JAX_NUM_PROCESSES``, ``FO_JAX_PROCESS_ID``)
    name the coordinator; on Cloud TPU and SLURM, ``FO_JAX_DISTRIBUTED=auto`` lets JAX discover it.
    Single-process runs (no such settings) do nothing. CPU processes use gloo collectives.
    """
    coordinator_address = coordinator_address or os.environ.get("FO_JAX_COORDINATOR")
    if num_processes is None and "FO_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["FO_JAX_NUM_PROCESSES"])
    if process_id is None and "FO_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["FO_JAX_PROCESS_ID"])
    if coordinator_address is None and os.environ.get("FO_JAX_DISTRIBUTED") != "auto":
        return False
    if jax.distributed.is_initialized():  # a second run in the same job (e.g. train, then resume)
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return jax.process_count() > 1


def batch_spec(ndim: int) -> P:
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """This process's rows (a pytree of numpy arrays) -> global arrays sharded over the batch axes.

    Every process passes the same number of rows; the global batch is their concatenation in
    process order.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(np.ndim(x))), np.asarray(x)),
        local)
