"""Orbax checkpoints of any parameter or train-state pytree, one directory per step."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves pytrees under `directory/<step>`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

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

  def close(self):
    self._manager.close()
