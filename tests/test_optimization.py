"""The RL learners' optimiser: the learning-rate schedule it takes, step by step."""
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners.optimization import make_optimizer


def _step_sizes(optimizer, steps: int) -> np.ndarray:
  """|update| of each step for a constant gradient: Adam's bias-corrected m/sqrt(v) is then
  exactly 1 (up to eps), so each step moves the parameter by that step's learning rate."""
  params = jnp.zeros(3)
  state = optimizer.init(params)
  sizes = []
  for _ in range(steps):
    updates, state = optimizer.update(jnp.full(3, 0.5), state, params)
    sizes.append(float(jnp.abs(updates[0])))
  return np.array(sizes)


def _expected(rate: float, steps: int, warmup: int, decay: int) -> np.ndarray:
  """The schedule written out: 0 -> rate over `warmup`, then rate -> 0 at step `decay`."""
  expected = []
  for step in range(steps):
    if step < warmup:
      expected.append(rate * step / warmup)
    elif decay:
      expected.append(rate * max(0.0, 1 - (step - warmup) / (decay - warmup)))
    else:
      expected.append(rate)
  return np.array(expected)


@pytest.mark.parametrize('warmup,decay', [(0, 0), (0, 10), (4, 0), (4, 10)])
def test_each_step_moves_by_the_scheduled_rate(warmup, decay):
  sizes = _step_sizes(make_optimizer(0.1, max_grad_norm=1.0, decay_steps=decay,
                                     warmup_steps=warmup), 14)
  np.testing.assert_allclose(sizes, _expected(0.1, 14, warmup, decay), atol=1e-6)


def test_a_warmup_as_long_as_the_decay_is_an_error_that_names_both():
  with pytest.raises(ValueError, match='warm-up .*10 steps.* decay'):
    make_optimizer(0.1, 1.0, decay_steps=10, warmup_steps=10)
