"""Joining the processes of a multi-host run (`jax.distributed.initialize`).

Three cases, in this order:
  1. `distributed.coordinator_address` is set: explicit, with `num_processes` and
     `process_id` (any cluster, or several processes on one machine over loopback).
  2. The environment is a cluster JAX can read by itself: a SLURM job step or an
     Open MPI job with more than one task, or a multi-host Cloud TPU slice that
     names its workers. `jax.distributed.initialize()` then takes everything from it.
  3. Otherwise one process. (On a Cloud TPU pod whose workers are not named in the
     environment, the TPU runtime still connects the hosts: initialization is
     optional there.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import ml_collections
from absl import logging


def _int(environ: Mapping[str, str], key: str) -> int:
  try:
    return int(environ.get(key, "1"))
  except ValueError:
    return 1


def cluster_env(environ: Mapping[str, str] = os.environ) -> str | None:
  """'slurm', 'openmpi' or 'tpu' when this process is one of several a cluster started."""
  if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and _int(environ, "SLURM_NTASKS") > 1:
    return "slurm"
  if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def init_distributed(config: ml_collections.ConfigDict) -> None:
  """Initializes jax.distributed when the config or the environment says so."""
  d = config.distributed
  if d.coordinator_address:
    if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
      raise ValueError(
        f"distributed.coordinator_address={d.coordinator_address!r} needs "
        f"distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes; "
        f"got num_processes={d.num_processes}, process_id={d.process_id}"
      )
    jax.distributed.initialize(
      coordinator_address=d.coordinator_address,
      num_processes=d.num_processes,
      process_id=d.process_id,
    )
  elif (kind := cluster_env()) is not None:
    logging.info("%s cluster detected: jax.distributed.initialize()", kind)
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # only process 0 logs progress
