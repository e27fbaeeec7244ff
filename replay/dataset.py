"""Learner side of replay: fixed-shape batches from a Reverb table."""
from collections.abc import Iterator

import tensorflow as tf
import reverb

from chorus import core
from chorus.replay.tables import trajectory_signature


def batch_iterator(address: str, table: str, batch_size: int, prompt_len: int,
                   completion_len: int, *, prefetch: int = 2) -> Iterator[core.TrajectoryBatch]:
  """Yields TrajectoryBatch of exactly `batch_size` rows ([B, P], [B, T]: one XLA shape).

  Reads through reverb.TrajectoryDataset, which streams and prefetches samples.
  """
  signature = trajectory_signature(prompt_len, completion_len)
  dataset = reverb.TrajectoryDataset(
      server_address=address, table=table, max_in_flight_samples_per_worker=2 * batch_size,
      dtypes=tf.nest.map_structure(lambda spec: spec.dtype, signature),
      shapes=tf.nest.map_structure(lambda spec: spec.shape, signature))
  dataset = dataset.map(lambda sample: sample.data).batch(batch_size, drop_remainder=True)
  for fields in dataset.prefetch(prefetch).as_numpy_iterator():
    yield core.TrajectoryBatch(**fields)
