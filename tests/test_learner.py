"""Tests for the learner's update: epochs over shuffled minibatches and batch preparation."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chorus import core
from chorus.learners import learner as learner_lib

B = 8


def _batch(rows: np.ndarray) -> core.TrajectoryBatch:
  """A batch whose `reward` holds each row's value; other fields are placeholders."""
  size = len(rows)
  zeros = np.zeros((size, 1), np.int32)
  return core.TrajectoryBatch(zeros, zeros.astype(bool), zeros, zeros.astype(bool),
                              zeros.astype(np.float32), rows.astype(np.float32),
                              np.zeros(size, bool), np.zeros(size, np.int64))


def _linear_loss(params, aux, batch):
  # d loss / d params = sum of the minibatch's rows: with SGD at rate 1, each optimiser
  # step subtracts its rows' sum, whatever their order.
  del aux
  loss = params * jnp.sum(batch.reward)
  return loss, {'loss': loss, 'rows': jnp.asarray(batch.reward.shape[0], jnp.float32),
                'prepared': jnp.mean(batch.extras.get('start', jnp.zeros(1)))}


@pytest.mark.parametrize('num_epochs, num_minibatches', [(1, 1), (3, 1), (1, 4), (3, 2)])
def test_each_epoch_takes_every_row_once_in_minibatches(num_epochs, num_minibatches):
  rows = np.arange(1, B + 1, dtype=np.float32)
  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(0.0), optimizer=optax.sgd(1.0),
                                num_epochs=num_epochs, num_minibatches=num_minibatches)
  metrics = learner.update(_batch(rows))
  assert learner.step == 1  # One learner step (one parameter version) per batch.
  np.testing.assert_allclose(learner.params, -num_epochs * rows.sum())
  assert metrics['rows'] == B / num_minibatches


def test_aux_follows_every_optimiser_step():
  learner = learner_lib.Learner(
      _linear_loss, params=jnp.float32(0.0), optimizer=optax.sgd(1.0),
      aux={'steps': jnp.float32(0.0)}, update_aux=lambda aux, params: {'steps': aux['steps'] + 1},
      num_epochs=2, num_minibatches=4)
  learner.update(_batch(np.ones(B)))
  assert learner.state.aux['steps'] == 8


def test_prepare_batch_sees_the_parameters_at_the_start_of_the_update():
  def prepare(params, aux, batch):
    del aux
    return batch._replace(extras={'start': jnp.full(batch.reward.shape, params)})

  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(5.0), optimizer=optax.sgd(1.0),
                                prepare_batch=prepare, num_epochs=4, num_minibatches=2)
  metrics = learner.update(_batch(np.ones(B)))
  assert metrics['prepared'] == 5.0  # In every one of the 8 steps, not the moving params.
  assert learner.params == 5.0 - 4 * B


def test_minibatches_must_divide_the_batch():
  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(0.0), optimizer=optax.sgd(1.0),
                                num_minibatches=3)
  with pytest.raises(ValueError, match='num_minibatches=3 must divide the batch size 8'):
    learner.update(_batch(np.ones(B)))
  with pytest.raises(ValueError, match='num_epochs must be an int >= 1'):
    learner_lib.Learner(_linear_loss, params=jnp.float32(0.0), optimizer=optax.sgd(1.0),
                        num_epochs=0)
