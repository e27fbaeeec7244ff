"""Actor side of replay: writes whole trajectories into a Reverb table."""
from collections.abc import Sequence
import time

import reverb

from chorus import core
from chorus import schema as schema_lib


class TrajectoryWriter:
  """Writes each trajectory as one Reverb item of fixed-shape padded fields.

  `write` sends a request's worth of trajectories with one flush (one round trip to the
  server, not one per trajectory) and returns once all are stored. On a full queue table
  that is when the learner has made room: the back-pressure that bounds policy lag.
  `should_stop` is polled while waiting so a stopping actor is never stuck inside Reverb.
  """

  def __init__(self, address: str, table: str, schema: schema_lib.TrajectorySchema,
               spec: core.SequenceSpec, *, poll_ms: int = 200):
    self._client = reverb.Client(address)
    self._writer = self._client.trajectory_writer(num_keep_alive_refs=1)
    self._table = table
    self._schema = schema
    self._spec = spec
    self._poll_ms = poll_ms
    self.blocked_seconds = 0.0

  def write(self, trajectories: Sequence[core.Trajectory], should_stop=lambda: False) -> bool:
    """Stores `trajectories`; returns False if `should_stop()` turned true while waiting.

    Rows are checked before anything is sent, so a bad trajectory (ValueError) stores none.
    """
    rows = [self._schema.padded_row(trajectory, self._spec) for trajectory in trajectories]
    for row in rows:
      self._writer.append(row)
      # `history` rebuilds the whole structure on every access: once per row, not per field.
      history = self._writer.history
      self._writer.create_item(self._table, priority=1.0,
                               trajectory={name: history[name][-1] for name in row})
    start = time.monotonic()
    try:
      while True:
        try:
          self._writer.end_episode(timeout_ms=self._poll_ms)
          return True
        except reverb.errors.DeadlineExceededError:
          if should_stop():
            return False
    finally:
      self.blocked_seconds += time.monotonic() - start

  def close(self):
    self._writer.close()
