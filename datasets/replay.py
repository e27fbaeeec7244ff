"""Recorded datasets as training data: fixed-shape batches, a filled Reverb table, prompts.

Three ways to use a recorded RLDS dataset (Chorus' own, or a foreign one through a
ForeignDatasetMapping) without actors:
  trajectory_batches  TrajectoryBatch straight from the files (tf.data), e.g. supervised
                      warm start or inverse soft-Q on a demonstration set.
  fill_replay         every episode into a Reverb table, for an off-policy learner that
                      then samples it as it would samples from actors.
  dataset_prompts     the distinct prompts, to evaluate a checkpoint on them.

Episodes longer than the fixed shapes stop the reader with the episode and the limit
named, unless `skip_too_long=True`, which leaves them out and logs how many.
"""
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import logging
import time

import numpy as np

from chorus import core
from chorus import schema as schema_lib
from chorus.datasets import rlds_files
from chorus.datasets import rlds_reader
from chorus.replay.writer import TrajectoryWriter

_LOG = logging.getLogger(__name__)
DEFAULT_SHUFFLE_BUFFER = 10_000


def _sources(paths, skip_corrupt: bool, mapping) -> rlds_reader.EpisodeSources:
  sources = rlds_reader.episode_sources(paths, skip_corrupt=skip_corrupt, mapping=mapping)
  for skipped in sources.skipped:
    _LOG.warning('Skipped damaged RLDS data: %s.', skipped)
  return sources


def _too_long(trajectory: core.Trajectory, schema: schema_lib.TrajectorySchema,
              spec: core.SequenceSpec) -> str | None:
  """Why `trajectory`'s token fields do not fit `spec`, or None if they do."""
  for field in schema.fields:
    if field.kind not in (schema_lib.PROMPT, schema_lib.COMPLETION, schema_lib.TOKENS):
      continue
    limit, limit_name = ((spec.prompt_len, 'prompt_len') if field.kind == schema_lib.PROMPT
                         else (spec.completion_len, 'completion_len'))
    tokens = trajectory.value(field.name)
    if len(tokens) > limit:
      return f'has {field.name} of {len(tokens)} tokens, over {limit_name}={limit}'
  return None


def _describe(trajectory: core.Trajectory) -> str:
  return (f'Episode {trajectory.episode_id} of actor {trajectory.actor_id} (prompt_id '
          f'{trajectory.prompt_id!r}, task {trajectory.task!r})')


class _LengthCheck:
  """Raises on, or counts and drops, episodes longer than the fixed shapes."""

  def __init__(self, schema: schema_lib.TrajectorySchema, spec: core.SequenceSpec,
               skip_too_long: bool):
    self.schema, self.spec = schema, spec
    self.skip_too_long = skip_too_long
    self.skipped = 0

  def fits(self, trajectory: core.Trajectory) -> bool:
    try:
      self.schema.check(trajectory)
    except ValueError as error:
      raise ValueError(f'{_describe(trajectory)}: {error} Train this agent on episodes '
                       'recorded with its fields.') from None
    problem = _too_long(trajectory, self.schema, self.spec)
    if problem is None:
      return True
    if not self.skip_too_long:
      raise ValueError(f'{_describe(trajectory)} {problem}. Raise the limit (the config\'s '
                       'sequence.prompt_len / completion_len) or pass skip_too_long=True to '
                       'leave such episodes out.')
    self.skipped += 1
    return False

  def log(self, what: str) -> None:
    if self.skipped:
      _LOG.warning('%s: left out %d episodes longer than %s (skip_too_long=True).', what,
                   self.skipped, self.spec)


def trajectory_batches(paths: rlds_files.Directories, batch_size: int,
                       spec: core.SequenceSpec, *,
                       schema: schema_lib.TrajectorySchema = schema_lib.CORE_SCHEMA,
                       shuffle: bool = True, seed: int = 0,
                       repeat: bool = True, skip_corrupt: bool = False,
                       skip_too_long: bool = False, mapping=None,
                       shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
                       ) -> Iterator[core.TrajectoryBatch]:
  """Fixed-shape batches of the episodes of recorded RLDS directories.

  A tf.data pipeline reads the checked episode files (and a running or killed writer's
  journalled episodes, as `read_episodes` does), shuffles the serialized episodes, decodes
  them in parallel, and rows are padded as replay pads them (schema.padded_row), so the
  batches are those a learner gets from Reverb: [B, P] prompts left-padded, [B, T]
  completions right-padded. Every batch has exactly `batch_size` rows (the remainder is
  dropped; with `repeat`, rows carry over into the next pass).

  Args:
    paths: writer directories, or folders of them such as a run's rlds/.
    batch_size: B.
    spec: P and T; a longer prompt or completion (or a second completion of the
      schema) raises ValueError (or is skipped, see skip_too_long).
    schema: the fields of the batches; each episode must carry the schema's extras.
    shuffle: shuffle episodes within a buffer of `shuffle_buffer`, differently each pass.
    seed: the shuffle's seed; the same seed gives the same batches.
    repeat: loop over the dataset forever (False: one pass).
    skip_corrupt: read around damaged files (see `read_episodes`).
    skip_too_long: leave out episodes that do not fit (P, T) instead of raising.
    mapping: a ForeignDatasetMapping for datasets that Chorus did not write.
    shuffle_buffer: serialized episodes held for shuffling.

  Yields:
    core.TrajectoryBatch with [B, P] / [B, T] / [B] fields.

  Raises:
    ValueError: an episode does not fit (P, T) or lacks a field of the schema and
      skip_too_long is False; or, with
      repeat, no episode fits at all.
    And those of `read_episodes`.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  sources = _sources(paths, skip_corrupt, mapping)
  check = _LengthCheck(schema, spec, skip_too_long)
  rows, epoch = [], 0
  while True:
    records = sources.records()
    if shuffle:
      records = records.shuffle(max(1, min(shuffle_buffer, sources.num_episodes)),
                                seed=seed + epoch, reshuffle_each_iteration=False)
    fitted = 0
    for trajectory in sources.trajectories(records):
      if not check.fits(trajectory):
        continue
      fitted += 1
      rows.append(schema.padded_row(trajectory, spec))
      if len(rows) == batch_size:
        yield schema.batch(rows)
        rows = []
    if epoch == 0:
      check.log(f'trajectory_batches({paths})')
    if not repeat:
      return
    if not fitted:
      raise ValueError(f'No episode of {sources.directories} fits {spec}, so no batch can be '
                       'made; raise the limits.')
    epoch += 1


def fill_replay(paths: rlds_files.Directories, replay_address: str | Sequence[str],
                table: str, schema: schema_lib.TrajectorySchema, spec: core.SequenceSpec, *,
                skip_corrupt: bool = False, skip_too_long: bool = False, mapping=None,
                max_episodes: int | None = None, timeout_s: float = 60.0,
                should_stop: Callable[[], bool] = lambda: False) -> int:
  """Writes every episode of recorded RLDS directories into a Reverb table.

  The episodes go in in read order through replay.TrajectoryWriter, as an actor's would,
  so an off-policy learner can then train on the table with no actors running. The
  table's rate limiter must let the whole dataset in without samples: e.g. a 'uniform'
  ReplayConfig with min_size_to_sample >= the number of episodes (inserts are never
  limited below it) or a table with reverb.rate_limiters.MinSize, and a max_size that
  holds them all (or older ones are evicted).

  Args:
    paths: writer directories, or folders of them.
    replay_address: 'host:port' of the Reverb server, or several, which get the episodes
      in turn (episode i goes to server i mod N).
    table: the trajectory table, whose signature is replay.tables.trajectory_signature(
      schema, spec).
    schema: the table's fields; each episode must carry the schema's extras.
    spec: the table's fixed lengths.
    skip_corrupt, skip_too_long, mapping: as in `trajectory_batches`.
    max_episodes: write at most this many.
    timeout_s: how long one insert may wait for the rate limiter before giving up.
    should_stop: polled while an insert waits; once true, returns what was written.

  Returns:
    How many episodes were written.

  Raises:
    TimeoutError: the table stopped accepting inserts (its rate limiter waits for samples).
    ValueError: an episode does not fit and skip_too_long is False.
  """
  addresses = [replay_address] if isinstance(replay_address, str) else list(replay_address)
  if not addresses:
    raise ValueError('fill_replay needs at least one Reverb address; got none.')
  sources = _sources(paths, skip_corrupt, mapping)
  check = _LengthCheck(schema, spec, skip_too_long)
  writers = [TrajectoryWriter(address, table, schema, spec) for address in addresses]
  count = 0
  try:
    for trajectory in sources.trajectories():
      if max_episodes is not None and count >= max_episodes:
        break
      if not check.fits(trajectory):
        continue
      address = addresses[count % len(addresses)]
      deadline = time.monotonic() + timeout_s
      stored = writers[count % len(addresses)].write(
          [trajectory], lambda: should_stop() or time.monotonic() > deadline)
      if not stored:
        if should_stop():
          _LOG.info('fill_replay stopped after %d episodes.', count)
          return count
        raise TimeoutError(
            f'Reverb table {table!r} at {address} accepted no insert for {timeout_s} s '
            f'after {count} episodes: its rate limiter waits for samples. Fill a table that '
            'takes the whole dataset without sampling (a uniform ReplayConfig with '
            'min_size_to_sample >= the dataset size, or reverb.rate_limiters.MinSize), or '
            'start the learner first.')
      count += 1
  finally:
    for writer in writers:
      writer.close()
  check.log(f'fill_replay({paths})')
  _LOG.info('Wrote %d episodes of %s into Reverb table %r at %s.', count, sources.directories,
            table, addresses)
  return count


@dataclasses.dataclass(frozen=True)
class DatasetPrompt:
  """One distinct prompt of a recorded dataset.

  Attributes:
    prompt_tokens: [P] int32, as fed to the model (BOS first).
    prompt_id: the task's id of the prompt, from its first episode ('' if unrecorded).
    task: the task of its first episode.
    num_episodes: how many episodes of the dataset have this prompt.
  """
  prompt_tokens: np.ndarray
  prompt_id: str
  task: str
  num_episodes: int


def dataset_prompts(paths: rlds_files.Directories, *, skip_corrupt: bool = False,
                    mapping=None) -> list[DatasetPrompt]:
  """The distinct prompts (by token content) of recorded RLDS directories, first seen first.

  For evaluating a checkpoint on the prompts of a recorded dataset: send
  `[p.prompt_tokens for p in prompts]` to the inference server.
  """
  sources = _sources(paths, skip_corrupt, mapping)
  prompts: dict[bytes, DatasetPrompt] = {}
  for trajectory in sources.trajectories():
    tokens = np.asarray(trajectory.prompt_tokens, np.int32)
    key = tokens.tobytes()
    seen = prompts.get(key)
    prompts[key] = (dataclasses.replace(seen, num_episodes=seen.num_episodes + 1) if seen else
                    DatasetPrompt(tokens, trajectory.prompt_id, trajectory.task, 1))
  return list(prompts.values())
