"""Orbax checkpoints of any parameter or train-state pytree, one directory per step."""
import logging
import multiprocessing
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves pytrees under `directory/<step>`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, create=True))

  def save(self, step: int, tree) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(tree)))
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, template, step: int | None = None):
    """The tree saved at `step` (default: the newest), with the structure of `template`.

    `template` holds arrays or jax.ShapeDtypeStructs (from `jax.eval_shape`: nothing is
    allocated for it).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}; train or warm-start first.')
    abstract = jax.tree_util.tree_map(_abstract, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_newest(self, template) -> tuple[int, object] | None:
    """(step, tree) of the newest checkpoint that restores; None if there is none.

    A checkpoint that fails to restore (truncated or damaged by a crash or a full disk) is
    logged and moved aside to `<directory>.damaged/<step>`, so that the steps saved after
    resuming from an older one do not collide with it; older ones are tried in turn.

    Raises:
      RuntimeError: there are checkpoints, and not one of them restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        tree = self.restore(template, step)
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        logging.warning('Checkpoint %s/%d does not restore (%s: %.200s); trying an older one.',
                        self.directory, step, type(error).__name__, error)
        damaged.append(step)
        continue
      if damaged:
        self._move_aside(damaged)
        logging.warning('Resumed from checkpoint %d; moved the damaged newer ones %s to %s.',
                        step, damaged, self.directory + '.damaged')
      return step, tree
    if steps:
      raise RuntimeError(f'None of the checkpoints {steps} in {self.directory} restores; see '
                         'the log for each one\'s error. Move the directory away to start over.')
    return None

  def _move_aside(self, steps: list[int]) -> None:
    self._manager.close()
    aside = self.directory + '.damaged'
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager = self._open()

  def close(self):
    self._manager.close()


def _abstract(x) -> jax.ShapeDtypeStruct:
  """x's shape and dtype; an array spread over several processes is not read for them."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype)


class SubprocessCheckpointer:
  """Saves like Checkpointer, from a child process: for one process of a learner that spans
  several (learners/distributed.py).

  Why a child: once `jax.distributed` is initialized, orbax 0.11.5 cannot save at all (its
  commit asks the distributed client for `key_value_try_get`, which jaxlib 0.4.34's client
  lacks), while restoring works. The child is spawned, so it has no distributed client; it
  is sent whole host trees (process 0 gathers them) and writes them with Checkpointer.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    context = multiprocessing.get_context('spawn')
    self._connection, child_end = context.Pipe()
    self._process = context.Process(target=_save_what_arrives,
                                    args=(child_end, os.fspath(directory), max_to_keep),
                                    name='checkpoint-writer', daemon=True)
    self._process.start()
    child_end.close()

  def save(self, step: int, tree) -> None:
    try:
      self._connection.send((step, jax.device_get(tree)))
      error = self._connection.recv()
    except (EOFError, OSError) as lost:  # Its end of the pipe closed: it died.
      self._process.join(timeout=10)
      raise RuntimeError(f'The checkpoint writer process ended (exit code '
                         f'{self._process.exitcode}) before saving step {step}; its error is '
                         'in this node\'s log.') from lost
    if error:
      raise RuntimeError(f'The checkpoint writer could not save step {step}: {error}')

  def close(self):
    if self._process.is_alive():
      self._connection.send(None)
    self._process.join(timeout=60)


def _save_what_arrives(connection, directory: str, max_to_keep: int | None) -> None:
  """The child's loop: saves each (step, tree) received until None (or the parent's end)."""
  jax.config.update('jax_platforms', 'cpu')  # Host trees only: leave the accelerators alone.
  checkpointer = Checkpointer(directory, max_to_keep)
  try:
    while (message := connection.recv()) is not None:
      try:
        checkpointer.save(*message)
        connection.send('')
      except Exception as error:  # pylint: disable=broad-except  (reported to the parent)
        connection.send(f'{type(error).__name__}: {error}')
  except EOFError:  # The parent ended.
    pass
  finally:
    checkpointer.close()
