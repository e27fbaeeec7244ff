"""Orbax checkpoints of any parameter or train-state pytree, one directory per step."""
import logging
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
    abstract = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
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
