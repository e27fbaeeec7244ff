"""Reverb tables for trajectories and the replay server node."""
from collections.abc import Callable
import dataclasses
import logging
import time

import reverb
import tensorflow as tf

from chorus import core
from chorus import schema as schema_lib
from chorus.metrics import MetricsWriter

TABLE_KINDS = ('queue', 'uniform')


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """Replay tables of one experiment.

  Attributes:
    table: name of the trajectory table.
    kind: 'queue' for on-policy learners (V-trace: FIFO, each trajectory sampled once,
      writers block when full, which bounds policy lag) or 'uniform' for off-policy ones.
    max_size: capacity in trajectories. For 'queue' this bounds the policy lag to about
      max_size / batch_size learner steps.
    min_size_to_sample: 'uniform' only; sampling waits until this many are stored.
    samples_per_insert: 'uniform' only; learner samples per inserted trajectory, or 0 for
      no ratio at all (offline training from a recorded dataset, where inserts stop once
      the dataset is in: sampling then only waits for `min_size_to_sample`).
    checkpoint_every_s: seconds between checkpoints of the tables (items and rate-limiter
      state) in RUN_DIR/checkpoints/replay_N, also written when the node stops; a
      restarted or resumed replay node starts from the newest. 0: only when it stops.
  """
  table: str = 'trajectories'
  kind: str = 'queue'
  max_size: int = 256
  min_size_to_sample: int = 64
  samples_per_insert: float = 4.0
  checkpoint_every_s: float = 30.0

  def __post_init__(self):
    if self.kind not in TABLE_KINDS:
      raise ValueError(f'Unknown replay kind {self.kind!r}; use one of {TABLE_KINDS}.')
    core.check_ranges(self, 'replay', max_size=(1, None), min_size_to_sample=(0, None),
                      samples_per_insert=(0, None), checkpoint_every_s=(0, None))


def trajectory_signature(schema: schema_lib.TrajectorySchema,
                         spec: core.SequenceSpec) -> dict[str, tf.TensorSpec]:
  """The stored row of one trajectory: the schema's padded row fields (no batch axis)."""
  return {name: tf.TensorSpec(shape, tf.as_dtype(dtype))
          for name, (shape, dtype) in schema.row_specs(spec).items()}


def make_tables(config: ReplayConfig, schema: schema_lib.TrajectorySchema,
                spec: core.SequenceSpec) -> list[reverb.Table]:
  signature = trajectory_signature(schema, spec)
  if config.kind == 'queue':
    return [reverb.Table.queue(config.table, config.max_size, signature=signature)]
  if config.samples_per_insert > 0:
    # Online: a sample-to-insert ratio keeps the learner from overfitting a few items.
    error_buffer = max(config.min_size_to_sample, 1) * max(config.samples_per_insert, 1.0)
    rate_limiter = reverb.rate_limiters.SampleToInsertRatio(
        config.samples_per_insert, config.min_size_to_sample, error_buffer)
  else:
    rate_limiter = reverb.rate_limiters.MinSize(config.min_size_to_sample)
  return [reverb.Table(name=config.table, sampler=reverb.selectors.Uniform(),
                       remover=reverb.selectors.Fifo(), max_size=config.max_size,
                       rate_limiter=rate_limiter, signature=signature)]


def serve(config: ReplayConfig, schema: schema_lib.TrajectorySchema, spec: core.SequenceSpec,
          port: int, should_stop: Callable[[], bool], checkpoint_dir: str,
          metrics: MetricsWriter):
  """Runs a Reverb server until `should_stop()`, its tables checkpointed in `checkpoint_dir`.

  The server starts from the newest checkpoint there (Reverb keeps only the newest), so a
  replay node that was killed loses only what came in after it. Every checkpoint and the
  restore go to `metrics` with the table's size and insert count.

  Reverb 0.14 listens on every interface ("[::]:port" is fixed inside its C++ server);
  it offers no bind address, so this node cannot be restricted to loopback. `chorus run
  --isolate-network` keeps other processes out around it (launch/network_namespace.py).
  """
  server = reverb.Server(make_tables(config, schema, spec), port=port,
                         checkpointer=reverb.checkpointers.DefaultCheckpointer(checkpoint_dir))
  client = reverb.Client(f'localhost:{port}')

  def record(kind: str):
    info = client.server_info()[config.table]
    metrics.write(kind=kind, items=info.current_size,
                  inserts=info.rate_limiter_info.insert_stats.completed)

  def checkpoint():
    record('replay_checkpoint')  # Before: the checkpoint holds at least these inserts.
    client.checkpoint()

  record('replay_restored')  # Zero items on a first start.
  logging.info('Reverb serving table %r (%s, max_size %d) on port %d', config.table, config.kind,
               config.max_size, port)
  next_checkpoint = time.monotonic() + config.checkpoint_every_s
  while not should_stop():
    time.sleep(0.2)
    if config.checkpoint_every_s and time.monotonic() >= next_checkpoint:
      checkpoint()
      next_checkpoint = time.monotonic() + config.checkpoint_every_s
  checkpoint()  # For `chorus run --resume`.
  server.stop()
