"""Multi-process start: which process this is, and joining the others.

One training job may run as several processes (one per host, each owning its local
devices); ``jax.distributed.initialize`` joins them into one JAX system whose
``jax.devices()`` are all the job's devices. :func:`detect` reads who this process is
from the environment (pure: a mapping in, a :class:`ProcessInfo` out), in this order:

1. ``RECML_COORDINATOR_ADDRESS`` (``host:port``), ``RECML_NUM_PROCESSES``,
   ``RECML_PROCESS_ID``: set by hand for local multi-process runs and tests; all three
   or none.
2. ``RECML_DISTRIBUTED=auto``: JAX's own cluster detection decides
   (``jax.distributed.initialize()`` without arguments: Cloud TPU VM metadata, GKE TPU
   variables, Slurm, Open MPI). The Vertex request of a multi-host TPU slice sets it
   (:func:`pipelines.dag.vertex_training_step`); on a GCE TPU VM slice, where the hosts
   are only known to the metadata server, set it yourself.
3. A multi-host TPU slice (source ``tpu``): ``TPU_WORKER_HOSTNAMES`` (or
   ``TPU_PROCESS_ADDRESSES``) listing more than one host, with ``TPU_WORKER_ID``, and
   ``MEGASCALE_NUM_SLICES`` / ``MEGASCALE_SLICE_ID`` for multislice; JAX's
   ``GkeTpuCluster`` reads the same variables, so :func:`initialize` lets JAX detect
   them. It comes before the CLUSTER_SPEC: the TPU runtime's view of the slice is the
   one the chips follow.
4. Vertex AI multi-worker custom jobs (source ``vertex``): Vertex sets ``CLUSTER_SPEC``
   on every replica::

       {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
                    "workerpool1": ["...-workerpool1-ab-0:2222", "...-workerpool1-ab-1:2222"]},
        "task": {"type": "workerpool1", "index": 1, "trial": ""},
        "environment": "cloud"}

   Process ids count the replicas over the pools in order ``workerpool0`` (the
   primary, one replica) to ``workerpool3`` (workerpool1 index 1 above is process 2 of
   3). The coordinator (JAX's key-value service, run by process 0) listens on
   workerpool0's host at the fixed port :data:`DEFAULT_COORDINATOR_PORT` (8476), or
   ``RECML_COORDINATOR_PORT`` when set (every replica must see the same value), not at
   the port CLUSTER_SPEC lists (2222, TensorFlow's convention). A CLUSTER_SPEC with a
   single replica is a single-process job.
5. Otherwise one process (source ``single``).

Malformed values raise ``ValueError`` naming the variable. Every process runs the same
command; :func:`initialize` joins, and :func:`is_primary` tells the one process that
writes logs, metrics and exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

DEFAULT_COORDINATOR_PORT = 8476
# Vertex's worker pools, in the order their replicas are numbered (distributed-training
# docs: primary, workers, parameter servers / reduction server, evaluators).
VERTEX_POOLS = ("workerpool0", "workerpool1", "workerpool2", "workerpool3")
_EXPLICIT = ("RECML_COORDINATOR_ADDRESS", "RECML_NUM_PROCESSES", "RECML_PROCESS_ID")

_AUTO_HINT = {"auto": "RECML_DISTRIBUTED=auto asks JAX to find the job's processes",
              "tpu": "the TPU variables describe a multi-host slice"}

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Who this process is in the job.

  Attributes:
    process_id: 0 .. num_processes - 1; process 0 hosts the coordinator.
    num_processes: the job's processes; 0 when only JAX's cluster detection knows it
      (source ``auto``, or ``tpu`` with hosts in the TPU metadata): :func:`initialize`
      returns the joined values.
    coordinator: ``host:port`` of the coordinator; "" for one process and when JAX's
      cluster detection chooses it (sources ``auto`` and ``tpu``).
    source: where it came from: ``explicit``, ``auto``, ``tpu``, ``vertex``, ``single``.
  """
  process_id: int
  num_processes: int
  coordinator: str
  source: str

  @property
  def multi_process(self) -> bool:
    return self.source != "single" and self.num_processes != 1


SINGLE = ProcessInfo(0, 1, "", "single")


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
  raw = env.get(name, "")
  try:
    value = int(str(raw).strip())
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {raw!r}") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _check_id(process_id: int, num_processes: int, name: str) -> None:
  if process_id >= num_processes:
    raise ValueError(f"{name} is {process_id} but the job has {num_processes} "
                     f"processes (ids 0..{num_processes - 1})")


def _address(value: str, name: str) -> str:
  host, sep, port = value.strip().rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{name} must be host:port, got {value!r}")
  return f"{host}:{port}"


def _explicit(env: Mapping[str, str]) -> ProcessInfo | None:
  present = [k for k in _EXPLICIT if env.get(k, "") != ""]
  if not present:
    return None
  missing = [k for k in _EXPLICIT if k not in present]
  if missing:
    raise ValueError(f"{', '.join(present)} set without {', '.join(missing)}: a local "
                     f"multi-process run needs all of {', '.join(_EXPLICIT)}")
  num = _int(env, "RECML_NUM_PROCESSES", minimum=1)
  pid = _int(env, "RECML_PROCESS_ID")
  _check_id(pid, num, "RECML_PROCESS_ID")
  coordinator = _address(env["RECML_COORDINATOR_ADDRESS"], "RECML_COORDINATOR_ADDRESS")
  return ProcessInfo(pid, num, coordinator, "explicit")


def _tpu(env: Mapping[str, str]) -> ProcessInfo | None:
  name = next((k for k in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
               if env.get(k, "")), None)
  hosts = [h.strip() for h in env[name].split(",") if h.strip()] if name else []
  slices = _int(env, "MEGASCALE_NUM_SLICES", 1) if env.get("MEGASCALE_NUM_SLICES") else 1
  if not hosts:  # multislice on GCE TPU VMs: the hosts are in the metadata server
    return ProcessInfo(0, 0, "", "tpu") if slices > 1 else None
  if len(hosts) * slices == 1:
    return None  # a single-host slice: one process
  if not env.get("TPU_WORKER_ID", ""):
    raise ValueError(f"{name} lists {len(hosts)} hosts but TPU_WORKER_ID is not set")
  worker = _int(env, "TPU_WORKER_ID")
  _check_id(worker, len(hosts), "TPU_WORKER_ID")
  slice_id = _int(env, "MEGASCALE_SLICE_ID") if env.get("MEGASCALE_SLICE_ID") else 0
  _check_id(slice_id, slices, "MEGASCALE_SLICE_ID")
  return ProcessInfo(slice_id * len(hosts) + worker, len(hosts) * slices, "", "tpu")


def _vertex(env: Mapping[str, str]) -> ProcessInfo | None:
  raw = env.get("CLUSTER_SPEC", "")
  if not raw:
    return None
  try:
    spec = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"CLUSTER_SPEC is not valid JSON: {e}") from None
  cluster: Any = spec.get("cluster") if isinstance(spec, dict) else None
  task: Any = spec.get("task") if isinstance(spec, dict) else None
  if not isinstance(cluster, dict) or not isinstance(task, dict):
    raise ValueError("CLUSTER_SPEC needs a 'cluster' object and a 'task' object, got "
                     f"{raw[:200]!r}")
  unknown = sorted(set(cluster) - set(VERTEX_POOLS))
  if unknown:
    raise ValueError(f"CLUSTER_SPEC: unknown worker pools {unknown} (expected "
                     f"{', '.join(VERTEX_POOLS)})")
  for pool, replicas in cluster.items():
    if not isinstance(replicas, list) or not all(isinstance(r, str) for r in replicas):
      raise ValueError(f"CLUSTER_SPEC: cluster.{pool} must be a list of host:port strings")
  task_type, index = task.get("type"), task.get("index")
  if task_type not in cluster:
    raise ValueError(f"CLUSTER_SPEC: task.type {task_type!r} is not a pool of the cluster "
                     f"({', '.join(sorted(cluster))})")
  if isinstance(index, bool) or not isinstance(index, int) or not (
      0 <= index < len(cluster[task_type])):
    raise ValueError(f"CLUSTER_SPEC: task.index {index!r} is not a replica of {task_type} "
                     f"(0..{len(cluster[task_type]) - 1})")
  if not cluster.get("workerpool0"):
    raise ValueError("CLUSTER_SPEC: cluster.workerpool0 (the primary replica) is empty")
  offsets, total = {}, 0
  for pool in VERTEX_POOLS:
    offsets[pool] = total
    total += len(cluster.get(pool, []))
  if total == 1:
    return None  # a single-replica job
  host = cluster["workerpool0"][0].rsplit(":", 1)[0]
  port = (_int(env, "RECML_COORDINATOR_PORT", 1) if env.get("RECML_COORDINATOR_PORT")
          else DEFAULT_COORDINATOR_PORT)
  coordinator = _address(f"{host}:{port}", "RECML_COORDINATOR_PORT")
  return ProcessInfo(offsets[task_type] + index, total, coordinator, "vertex")


def detect(env: Mapping[str, str] = os.environ) -> ProcessInfo:
  """This process's place in the job, from the environment (see the module docstring).

  Raises:
    ValueError: a malformed or incomplete setting, naming the variable.
  """
  explicit = _explicit(env)
  if explicit:
    return explicit
  mode = env.get("RECML_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise ValueError(f"RECML_DISTRIBUTED must be 'auto' or unset, got {mode!r}")
  if mode == "auto":
    return ProcessInfo(0, 0, "", "auto")
  return _tpu(env) or _vertex(env) or SINGLE


def initialize(env: Mapping[str, str] = os.environ) -> ProcessInfo:
  """Joins the job's processes (once; later calls return at once) and returns who this
  process is. Must run before anything touches a JAX backend (``jax.devices()``, a
  computation). One process: nothing to do.

  On CPU, cross-process collectives go through gloo (JAX's default; set here if
  ``jax_cpu_collectives_implementation`` was cleared).
  """
  info = detect(env)
  if not info.multi_process:
    return info
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.distributed.is_initialized():
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if info.source in ("auto", "tpu"):
      try:
        jax.distributed.initialize()
      except ValueError as e:  # JAX's detection found no cluster
        raise ValueError(f"{_AUTO_HINT[info.source]}, but JAX's cluster detection found "
                         f"no cluster to join ({e})") from e
    else:
      jax.distributed.initialize(coordinator_address=info.coordinator,
                                 num_processes=info.num_processes,
                                 process_id=info.process_id)
    logger.info("joined as process %d of %d (%s, coordinator %s)", jax.process_index(),
                jax.process_count(), info.source, info.coordinator or "from JAX")
  return dataclasses.replace(info, process_id=jax.process_index(),
                             num_processes=jax.process_count())


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs, metrics and exports."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0
