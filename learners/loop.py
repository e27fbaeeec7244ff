"""The learner loop shared by every algorithm: sample, update, publish, log, checkpoint."""
from collections.abc import Callable, Iterator
import dataclasses
import logging
import time

import numpy as np

from chorus import core
from chorus import prefetch
from chorus.metrics import MetricsWriter


class DivergenceError(RuntimeError):
  """The learner skipped `max_consecutive_skips` updates in a row: training diverged."""


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """The learner loop.

  Attributes:
    batch_size: trajectories per update.
    learning_rate: Adam learning rate (its peak with `learning_rate_decay`).
    learning_rate_decay: decay it linearly to 0 at `max_steps`: late, with a peaked policy
      and rewards near their maximum, a constant rate let the policy drift away.
    learning_rate_warmup: updates over which the rate first rises linearly from 0. Adam's
      first steps move every parameter by about the rate, whatever the gradient says.
    max_grad_norm: global gradient-norm clip.
    max_steps: updates before the learner stops (and with it the run).
    publish_every: updates between parameter pushes to the inference servers.
    log_every: updates between metrics lines.
    checkpoint_every: updates between checkpoints (one is also written at the end).
    max_consecutive_skips: updates in a row skipped for a non-finite loss or gradient
      (see learner.py) after which the learner stops with DivergenceError.
    processes: processes of the one learner (JAX's multi-controller model, one per
      accelerator host; learners/distributed.py). Each samples batch_size / processes rows
      of every batch; process 0 publishes, logs and checkpoints. A learner of several
      processes is not restarted: a crash of one ends the run.
  """
  batch_size: int = 32
  learning_rate: float = 1e-4
  learning_rate_decay: bool = False
  learning_rate_warmup: int = 0
  max_grad_norm: float = 1.0
  max_steps: int = 400
  publish_every: int = 1
  log_every: int = 10
  checkpoint_every: int = 100
  max_consecutive_skips: int = 20
  processes: int = 1

  def __post_init__(self):
    core.check_ranges(self, 'learner', batch_size=(1, None), learning_rate=(0, 10.0),
                      learning_rate_warmup=(0, None),
                      max_grad_norm=(1e-8, None), max_steps=(1, None),
                      publish_every=(1, None), log_every=(1, None),
                      checkpoint_every=(1, None), max_consecutive_skips=(1, None),
                      processes=(1, None))
    if self.learning_rate_decay and self.learning_rate_warmup >= self.max_steps:
      raise ValueError(
          f'learner.learning_rate_warmup ({self.learning_rate_warmup}) must be below '
          f'learner.max_steps ({self.max_steps}) when the rate decays to 0 there; shorten '
          'the warm-up or raise max_steps.')


def run_learner(learner, batches: Iterator[core.TrajectoryBatch], config: LearnerConfig, *,
                publish: Callable[[dict[str, object], int], None],
                checkpoint: Callable[[int, object], None], metrics: MetricsWriter | None,
                tensorboard_dir: str | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> int:
  """Runs `learner.update` on `batches` until `config.max_steps`; returns the last step.

  `publish(models, version)` pushes or schedules `learner.published_params()` (served
  model name -> parameters); its time is logged as `publish_seconds`, so a publisher that
  pushes in the background (background.BackgroundPublisher.submit) keeps it near 0.
  The next batch is read while an update runs (prefetch.Prefetcher).

  Parameter version = learner step: the version pushed after k updates is k, so the policy
  lag of a batch is exactly (updates done so far) - (version that sampled it). After a
  restart from a checkpoint at step k, trajectories sampled by the lost versions above k
  show a negative lag until they have left replay.

  An update the learner skipped (`skipped_update` in its metrics: a non-finite loss,
  gradient, reward or result, see learner.py) changes nothing: it is logged with the rows
  whose rewards were not finite, counted (`skipped_updates` in the metrics), and neither
  published nor checkpointed. `config.max_consecutive_skips` in a row raise
  DivergenceError. With `metrics` None (a learner process other than the first) nothing is
  logged.
  """
  summary_writer = None
  if tensorboard_dir:
    # Imported here: TensorFlow costs about 3 CPU-seconds to import, and the processes that
    # only load a config (the evaluator, the servers) import this module.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    summary_writer = tf.summary.create_file_writer(tensorboard_dir)
  window: dict[str, list[float]] = {}
  window_start, trajectories_seen = time.monotonic(), 0
  step = learner.step
  skipped_updates = consecutive_skips = 0
  batches = prefetch.Prefetcher(batches)
  while step < config.max_steps and not should_stop():
    wait_start = time.monotonic()
    batch = next(batches)
    wait_seconds = time.monotonic() - wait_start
    lag = step - np.asarray(batch.param_version)
    update_start = time.monotonic()
    update_metrics = learner.update(batch)
    update_seconds = time.monotonic() - update_start
    if update_metrics.pop('skipped_update', 0.0) > 0:
      skipped_updates += 1
      consecutive_skips += 1
      _log_skip(batch, step, consecutive_skips, metrics)
      if consecutive_skips >= config.max_consecutive_skips:
        raise DivergenceError(
            f'The learner skipped {consecutive_skips} updates in a row at step {step}: the '
            'loss, gradient, rewards or parameters were not finite each time. Lower '
            'learner.learning_rate, check the task\'s rewards, or resume from an earlier '
            'checkpoint.')
      continue
    consecutive_skips = 0
    step = learner.step
    trajectories_seen += len(batch.reward)
    update_metrics.update(policy_lag=float(lag.mean()), max_policy_lag=float(lag.max()),
                          skipped_updates=skipped_updates,
                          batch_wait_seconds=wait_seconds, update_seconds=update_seconds)
    if step % config.publish_every == 0 or step == config.max_steps:
      publish_start = time.monotonic()
      publish(learner.published_params(), step)
      update_metrics['publish_seconds'] = time.monotonic() - publish_start
    for name, value in update_metrics.items():
      window.setdefault(name, []).append(value)
    if step % config.log_every == 0 or step == config.max_steps:
      elapsed = time.monotonic() - window_start
      means = {name: float(np.mean(values)) for name, values in window.items()}
      means['max_policy_lag'] = float(np.max(window['max_policy_lag']))
      means['skipped_updates'] = float(skipped_updates)
      means['trajectories_per_second'] = trajectories_seen / elapsed
      # Share of the window's wall time inside updates: what prefetching and background
      # publishing raise.
      means['duty_cycle'] = float(np.sum(window['update_seconds'])) / elapsed
      means['window_seconds'] = elapsed
      if metrics:
        metrics.write(kind='learner', step=step, **means)
      if summary_writer:
        with summary_writer.as_default(step=step):
          for name, value in means.items():
            tf.summary.scalar(name, value)
      logging.info('learner step %d: %s', step, means)
      window, window_start, trajectories_seen = {}, time.monotonic(), 0
    if step % config.checkpoint_every == 0 or step == config.max_steps:
      checkpoint(step, learner.state)
  if summary_writer:
    summary_writer.flush()
  return step


def _log_skip(batch: core.TrajectoryBatch, step: int, consecutive: int,
              metrics: MetricsWriter | None) -> None:
  """Logs a skipped update with the batch rows whose rewards were not finite."""
  reward = np.asarray(batch.reward)
  rows = np.flatnonzero(~np.isfinite(reward))
  versions = np.asarray(batch.param_version)[rows]
  logging.warning('Learner update at step %d skipped (%d in a row): non-finite loss, gradient, '
                  'reward or parameters; rows with non-finite rewards %s (param versions %s) '
                  'of %d.', step, consecutive, rows.tolist()[:16], versions.tolist()[:16],
                  len(reward))
  if metrics:
    metrics.write(kind='learner_skip', step=step, consecutive_skips=consecutive,
                  nonfinite_reward_rows=rows.tolist()[:16])
