"""The replay tables' config: kept apart from tables.py so that loading it imports no Reverb."""
import dataclasses

from chorus import core

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
