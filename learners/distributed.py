"""One learner across several processes (hosts): JAX's multi-controller model.

Every process of a learner runs the same program: `jax.distributed.initialize` joins them
(process 0's address is the coordinator), the device mesh then spans every process's
devices, and each update is one jit over arrays sharded across them. Each process feeds
its own share of a batch (`global_batch`), reads the same checkpoints, and takes part in
gathering the parameters before process 0 publishes them (`gather_to_host`); only process
0 publishes and writes metrics. On CPUs the processes talk through Gloo collectives, so
the same code runs on loopback for tests and on GPU/TPU hosts for real.
"""
import dataclasses

import jax
from jax.experimental import multihost_utils
import numpy as np

from chorus import core
from chorus.models import sharding


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process stands among a learner's processes.

  Attributes:
    index: this process's index, 0 for the coordinator.
    count: how many processes the learner has.
    coordinator: host:port of process 0's coordination service.
  """
  index: int = 0
  count: int = 1
  coordinator: str = ''

  @property
  def is_primary(self) -> bool:
    return self.index == 0


def initialize(group: ProcessGroup, bind_address: str = '') -> None:
  """Joins the learner's processes into one JAX runtime (before any device is used).

  A single process needs nothing. CPU devices need Gloo for cross-process collectives.
  Process 0 serves the coordination service on `bind_address` (default: every interface
  at the coordinator's port, JAX's default).
  """
  if group.count == 1:
    return
  if not group.coordinator:
    raise ValueError('A learner of several processes needs the coordinator address of '
                     'process 0.')
  # Only the CPU backend reads this; GPUs and TPUs keep NCCL and ICI.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=group.coordinator,
                             num_processes=group.count, process_id=group.index,
                             coordinator_bind_address=bind_address or None)


def shutdown() -> None:
  """Leaves the learner's JAX runtime: a barrier of every process (they end together)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (a collective: all must call it). Processes that
  stop together stay in step: one that stopped alone would leave the others waiting in
  their next update's collectives."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def global_batch(local: core.TrajectoryBatch, mesh) -> core.TrajectoryBatch:
  """The global batch whose rows on this process are `local` ([B / processes, ...] each).

  Rows are split over the mesh's batch axes; each process holds its own rows, read from
  its own replay stream. One process: `local` as it is.
  """
  if jax.process_count() == 1:
    return local
  batch_sharding = sharding.batch_sharding(mesh)

  def to_global(array):
    array = np.asarray(array)
    shape = (array.shape[0] * jax.process_count(),) + array.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding, array, shape)

  return jax.tree_util.tree_map(to_global, local)


def gather_to_host(tree):
  """`tree` as host numpy arrays, whole, on every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
