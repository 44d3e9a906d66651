"""Multi-host setup: a guarded `jax.distributed.initialize` and host-local -> global batches."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)
_INITIALIZED = False


def initialize(dist_cfg) -> None:
    """Call jax.distributed.initialize once, before any backend use.

    Explicit config (coordinator_address, num_processes, process_id) wins; otherwise jax auto-detects the
    cluster (SLURM, TPU pods, Open MPI...) from the environment. Disabled configs do nothing.
    """
    global _INITIALIZED
    if _INITIALIZED or not dist_cfg.enabled:
        return
    if dist_cfg.local_device_count:
        jax.config.update("jax_num_cpu_devices", dist_cfg.local_device_count)
    kwargs = {"initialization_timeout": dist_cfg.initialization_timeout}
    for key in ("coordinator_address", "num_processes", "process_id"):
        value = getattr(dist_cfg, key)
        if value is None:
            env = os.environ.get(f"MEMLM_{key.upper()}")
            value = (int(env) if key != "coordinator_address" else env) if env else None
        if value is not None:
            kwargs[key] = value
    if "coordinator_address" not in kwargs and not _cluster_detected():
        from memlm.errors import UserError

        raise UserError("distributed.enabled=true but no cluster was detected (SLURM, TPU pod, Open MPI, ...): set "
                        "distributed.coordinator_address, num_processes and process_id (or MEMLM_COORDINATOR_ADDRESS, "
                        "MEMLM_NUM_PROCESSES, MEMLM_PROCESS_ID)")
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _cluster_detected() -> bool:
    """Whether one of jax's cluster environments (what jax.distributed.initialize auto-detects) is present."""
    try:
        from jax._src import clusters

        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # a jax laid out otherwise: let jax.distributed.initialize decide
        return True


def host_slots(global_batch: int) -> list[int]:
    """The global batch rows this process feeds (contiguous, in process order).

    Rows are laid out over ("data", "fsdp") in device order, and devices are ordered by process, so process
    p owns rows [p * B / P, (p + 1) * B / P).
    """
    n, p = jax.process_count(), jax.process_index()
    if global_batch % n:
        from memlm.errors import UserError

        raise UserError(f"train.batch_size={global_batch} is not divisible by the {n} processes")
    per = global_batch // n
    return list(range(p * per, (p + 1) * per))


def to_global(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """Host-local numpy rows -> global jax.Arrays with the batch sharding."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}
