"""Tests for PPO: GAE against a numpy loop over t, the clipped surrogate and the loss."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners import ppo
from chorus.learners import token_mdp

B, T = 6, 8


def _rows(seed, gamma=1.0):
  """Rows of random lengths, terminated or truncated, NaN on padding and beyond V(s_L)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[:3] = 1, T, T  # A one-token row and two full-length rows.
  terminated = rng.uniform(size=B) < 0.5
  terminated[:3] = True, False, True  # Full length: one truncated, one ending with EOS.
  mask = np.arange(T)[None, :] < lengths[:, None]
  rewards = np.where(mask, rng.normal(size=(B, T)), np.nan).astype(np.float32)
  values = rng.normal(size=(B, T + 1)).astype(np.float32)
  values = np.where(np.arange(T + 1)[None, :] > lengths[:, None], np.nan, values)
  discounts = np.asarray(token_mdp.token_discounts(mask, terminated, gamma))
  return dict(values=values.astype(np.float32), rewards=rewards, discounts=discounts,
              mask=mask), lengths, terminated


def _numpy_gae(values, rewards, length, terminated, gamma, lambda_):
  """The paper's recursion, a float64 loop over the row's real steps."""
  advantages = np.zeros(length)
  next_advantage = 0.0
  for t in reversed(range(length)):
    last = t == length - 1
    discount = 0.0 if (last and terminated) else gamma
    delta = rewards[t] + discount * values[t + 1] - values[t]
    next_advantage = delta + discount * lambda_ * (0.0 if last else next_advantage)
    advantages[t] = next_advantage
  return advantages, advantages + np.asarray(values[:length], np.float64)


@pytest.mark.parametrize('gamma, lambda_', [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.9, 0.5)])
def test_gae_matches_a_numpy_loop_on_terminated_truncated_and_padded_rows(gamma, lambda_):
  inputs, lengths, terminated = _rows(seed=0, gamma=gamma)
  out = ppo.gae(**inputs, lambda_=lambda_)
  for b, length in enumerate(lengths):
    advantages, returns = _numpy_gae(inputs['values'][b], inputs['rewards'][b], length,
                                     terminated[b], gamma, lambda_)
    np.testing.assert_allclose(out.advantages[b, :length], advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.returns[b, :length], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.advantages[b, length:], 0.0)
    np.testing.assert_array_equal(out.returns[b, length:], 0.0)


def test_gae_returns_are_bootstrapped_returns_at_lambda_one_and_td_targets_at_zero():
  # Row 0 truncated after 3 tokens (bootstraps V(s_3) = 10); row 1 terminated after 2
  # (its V(s_2) = 100 must not count).
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  rewards = np.array([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
  values = np.array([[7.0, -3.0, 4.0, 10.0, 55.0], [2.0, 8.0, 100.0, 6.0, 6.0]])
  discounts = token_mdp.token_discounts(mask, np.array([False, True]))
  monte_carlo = ppo.gae(values, rewards, discounts, mask, lambda_=1.0)
  np.testing.assert_allclose(monte_carlo.returns, [[16.0, 15.0, 13.0, 0.0],
                                                   [2.0, 1.0, 0.0, 0.0]])
  one_step = ppo.gae(values, rewards, discounts, mask, lambda_=0.0)
  np.testing.assert_allclose(one_step.returns, [[-2.0, 6.0, 13.0, 0.0], [9.0, 1.0, 0.0, 0.0]])


def test_gae_gets_no_gradient_and_checks_its_inputs():
  inputs, _, _ = _rows(seed=1)
  inputs['values'] = np.nan_to_num(inputs['values'])
  grad = jax.grad(lambda v: ppo.gae(**{**inputs, 'values': v}, lambda_=0.9).advantages.sum())(
      inputs['values'])
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(AssertionError, match=re.escape('[B, T + 1]')):
    ppo.gae(**{**inputs, 'values': inputs['values'][:, :-1]}, lambda_=0.9)
  with pytest.raises(ValueError, match='lambda_ must be in'):
    ppo.gae(**inputs, lambda_=1.5)


def test_clipped_surrogate_matches_numpy():
  rng = np.random.default_rng(2)
  log_ratios = rng.normal(scale=0.5, size=(4, 50)).astype(np.float32)
  advantages = rng.normal(size=(4, 50)).astype(np.float32)
  ratios = np.exp(log_ratios.astype(np.float64))
  expected = np.minimum(ratios * advantages, np.clip(ratios, 0.8, 1.2) * advantages)
  np.testing.assert_allclose(ppo.clipped_surrogate(log_ratios, advantages, clip_epsilon=0.2),
                             expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('ratio, advantage, moves', [
    (1.5, 1.0, False),   # Above 1 + eps, A > 0 pushes higher: clipped, no gradient.
    (0.5, -1.0, False),  # Below 1 - eps, A < 0 pushes lower: clipped, no gradient.
    (0.5, 1.0, True),    # Below 1 - eps with A > 0: still pulled back up.
    (1.5, -1.0, True),   # Above 1 + eps with A < 0: still pulled back down.
    (1.1, 1.0, True), (0.9, -1.0, True),  # Inside the range.
])
def test_surrogate_gradient_is_zero_outside_the_clip_range_only_on_the_advantage_side(
    ratio, advantage, moves):
  grad = jax.grad(lambda log_ratio: ppo.clipped_surrogate(
      log_ratio, jnp.float32(advantage), clip_epsilon=0.2))(jnp.float32(np.log(ratio)))
  # d(r A)/d(log r) = r A where the unclipped term is the minimum.
  np.testing.assert_allclose(grad, ratio * advantage if moves else 0.0, rtol=1e-6)


def _loss_inputs(seed):
  inputs, lengths, _ = _rows(seed)
  mask = inputs['mask']
  rng = np.random.default_rng(seed + 100)

  def per_token(scale=1.0):
    return np.where(mask, rng.normal(scale=scale, size=(B, T)), np.nan).astype(np.float32)

  logprobs = np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32)
  return dict(logprobs=logprobs,
              behaviour_logprobs=(logprobs + per_token(0.4)).astype(np.float32),
              values=np.nan_to_num(inputs['values']), entropy=np.abs(per_token()),
              advantages=per_token(), returns=per_token(), old_values=per_token(), mask=mask)


@pytest.mark.parametrize('value_clip', [0.0, 0.3])
def test_ppo_loss_matches_numpy_and_ignores_nan_padding(value_clip):
  inputs = _loss_inputs(seed=3)
  mask = inputs['mask']
  f64 = {name: np.asarray(value, np.float64) for name, value in inputs.items()}
  ratios = np.exp(f64['logprobs'] - f64['behaviour_logprobs'])
  surrogate = np.minimum(ratios * f64['advantages'],
                         np.clip(ratios, 0.8, 1.2) * f64['advantages'])
  values = f64['values'][:, :-1]
  value_errors = (values - f64['returns']) ** 2
  if value_clip:
    clipped = f64['old_values'] + np.clip(values - f64['old_values'], -value_clip, value_clip)
    value_errors = np.maximum(value_errors, (clipped - f64['returns']) ** 2)
  per_token = -surrogate + 0.5 * 0.5 * value_errors - 0.01 * f64['entropy']
  expected = np.sum(np.where(mask, per_token, 0.0)) / mask.sum()

  def loss(logprobs, values):
    return ppo.ppo_loss(**{**inputs, 'logprobs': logprobs, 'values': values},
                        clip_epsilon=0.2, value_cost=0.5, value_clip=value_clip,
                        entropy_cost=0.01)

  (value, metrics), (logprob_grad, value_grad) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(inputs['logprobs'], inputs['values'])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  outside = (ratios > 1.2) | (ratios < 0.8)
  np.testing.assert_allclose(metrics['clip_fraction'], outside[mask].mean(), rtol=1e-6)
  assert np.all(np.isfinite(logprob_grad)) and np.all(np.isfinite(value_grad))
  np.testing.assert_array_equal(logprob_grad[~mask], 0.0)
  np.testing.assert_array_equal(value_grad[:, :-1][~mask], 0.0)
  np.testing.assert_array_equal(value_grad[:, -1], 0.0)  # The bootstrap value is not trained.


def test_ppo_value_gradient_is_the_value_error_and_targets_are_constants():
  inputs = _loss_inputs(seed=4)
  mask = inputs['mask']
  grads = jax.grad(lambda values, returns, advantages: ppo.ppo_loss(
      **{**inputs, 'values': values, 'returns': returns, 'advantages': advantages},
      value_cost=1.0)[0], argnums=(0, 1, 2))(inputs['values'], inputs['returns'],
                                              inputs['advantages'])
  expected = np.where(mask, inputs['values'][:, :-1] - inputs['returns'], 0.0) / mask.sum()
  np.testing.assert_allclose(grads[0][:, :-1], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)


def test_ppo_loss_checks_shapes_and_coefficients():
  inputs = _loss_inputs(seed=5)
  with pytest.raises(AssertionError, match=re.escape('[B, T + 1]')):
    ppo.ppo_loss(**{**inputs, 'values': inputs['values'][:, :-1]})
  with pytest.raises(ValueError, match='value_clip must be >= 0'):
    ppo.ppo_loss(**inputs, value_clip=-1.0)
  with pytest.raises(ValueError, match='clip_epsilon must be > 0'):
    ppo.ppo_loss(**inputs, clip_epsilon=0.0)
