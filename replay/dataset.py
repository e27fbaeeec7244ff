"""Learner side of replay: fixed-shape batches from one or several Reverb servers."""
from collections.abc import Iterator, Sequence

import reverb
import tensorflow as tf

from chorus import core
from chorus import schema as schema_lib
from chorus.replay.tables import trajectory_signature


def batch_iterator(addresses: str | Sequence[str], table: str, batch_size: int,
                   schema: schema_lib.TrajectorySchema,
                   spec: core.SequenceSpec) -> Iterator[core.TrajectoryBatch]:
  """Yields TrajectoryBatch of exactly `batch_size` rows ([B, P], [B, T]: one XLA shape).

  Reads through reverb.TrajectoryDataset, which streams samples, a quarter of a batch in
  flight per server: every row taken out of a queue table before the learner needs it is
  a row whose policy lag grows while it waits (the learner loop already reads the next
  batch during an update, learners/background.py). With several servers, rows come from
  whichever server has data first, so a slow shard never stalls the learner while others have data.
  """
  addresses = [addresses] if isinstance(addresses, str) else list(addresses)
  signature = trajectory_signature(schema, spec)

  def trajectories(address):
    return reverb.TrajectoryDataset(
        server_address=address, table=table,
        max_in_flight_samples_per_worker=max(1, batch_size // 4),
        dtypes=tf.nest.map_structure(lambda spec: spec.dtype, signature),
        shapes=tf.nest.map_structure(lambda spec: spec.shape, signature))

  if len(addresses) == 1:
    dataset = trajectories(addresses[0])
  else:
    dataset = tf.data.Dataset.from_tensor_slices(addresses).interleave(
        trajectories, cycle_length=len(addresses), block_length=1,
        num_parallel_calls=len(addresses), deterministic=False)
  dataset = dataset.map(lambda sample: sample.data).batch(batch_size, drop_remainder=True)
  for fields in dataset.as_numpy_iterator():
    yield schema_lib.batch_from_arrays(fields)
