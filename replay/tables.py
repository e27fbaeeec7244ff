"""Reverb tables for trajectories and the replay server node."""
from collections.abc import Callable
import logging
import time

import reverb
import tensorflow as tf

from chorus import core
from chorus import schema as schema_lib
from chorus.metrics import MetricsWriter
from chorus.replay.config import ReplayConfig

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
