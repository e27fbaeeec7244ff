"""A learner resumes from the newest checkpoint that restores: a truncated newest one (a
crash or a full disk mid-write) is moved aside and the previous one is used."""
import os

import jax
import numpy as np
import optax
import pytest

from chorus import models
from chorus.learners import learner as learner_lib
from chorus.models.checkpoints import Checkpointer
from chorus.models.checkpoints import SubprocessCheckpointer


def _truncate_every_file(directory: str) -> int:
  """Cuts each file under `directory` to half its size; returns how many it cut."""
  count = 0
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, 'r+b') as file:
        file.truncate(size // 2)
      count += 1
  return count


def _learner():
  decoder = models.DecoderConfig.tiny(32)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  return learner_lib.Learner(lambda p, aux, batch: (0.0, {}), params=params,
                             optimizer=optax.adam(1e-3))


def _state_at(state, step: int):
  """`state` with every float leaf set to `step` (so a restore says which step it read)."""
  return jax.tree_util.tree_map(
      lambda x: np.full(np.shape(x), step, np.asarray(x).dtype), state)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  directory = str(tmp_path / 'checkpoints' / 'learner')
  learner = _learner()
  checkpointer = Checkpointer(directory)
  for step in (10, 20, 30):
    checkpointer.save(step, _state_at(learner.state, step))
  checkpointer.close()
  assert _truncate_every_file(os.path.join(directory, '30')) > 0

  # What the learner node does on start: a fresh process, a fresh Checkpointer.
  checkpointer = Checkpointer(directory)
  step, state = checkpointer.restore_newest(learner.state)
  assert step == 20
  learner.restore(state)
  assert learner.step == 20
  jax.tree_util.tree_map(lambda x: np.testing.assert_array_equal(np.asarray(x), 20),
                         learner.state)
  assert os.path.isdir(directory + '.damaged/30')
  # Training on from step 20 saves step 30 again without colliding with the damaged one.
  checkpointer.save(30, _state_at(learner.state, 31))
  assert checkpointer.restore_newest(learner.state)[0] == 30
  checkpointer.close()


def test_no_checkpoint_is_a_fresh_start_and_none_restoring_is_an_error(tmp_path):
  learner = _learner()
  checkpointer = Checkpointer(str(tmp_path / 'empty'))
  assert checkpointer.restore_newest(learner.state) is None
  checkpointer.close()

  directory = str(tmp_path / 'all_damaged')
  checkpointer = Checkpointer(directory)
  checkpointer.save(5, learner.state)
  checkpointer.close()
  _truncate_every_file(os.path.join(directory, '5'))
  checkpointer = Checkpointer(directory)
  with pytest.raises(RuntimeError, match=r'None of the checkpoints \[5\]'):
    checkpointer.restore_newest(learner.state)
  checkpointer.close()


def test_a_checkpoint_saved_from_a_child_process_restores_as_one_saved_here(tmp_path):
  learner = _learner()
  directory = str(tmp_path / 'child')
  writer = SubprocessCheckpointer(directory, max_to_keep=2)
  for step in (1, 2, 3):
    writer.save(step, _state_at(learner.state, step))
  with pytest.raises(RuntimeError, match="could not save step 4: ValueError: Unsupported type"):
    writer.save(4, {'not_an_array': {1, 2}})  # The child reports the error and goes on.
  writer.save(4, learner.state)
  writer.close()
  assert not writer._process.is_alive()  # pylint: disable=protected-access
  reader = Checkpointer(directory)
  assert reader._manager.all_steps() == [3, 4]  # pylint: disable=protected-access
  restored = reader.restore(learner.state, step=3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, _state_at(learner.state, 3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, reader.restore(learner.state, step=4),
                         jax.device_get(learner.state))
  reader.close()


def test_a_child_writer_that_cannot_start_fails_the_save_with_its_exit_code(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  writer = SubprocessCheckpointer(str(blocker / 'checkpoints'))
  with pytest.raises(RuntimeError, match=r'checkpoint writer process ended \(exit code 1\) '
                                         r'before saving step 7'):
    writer.save(7, {'x': np.zeros(3)})
  writer.close()
