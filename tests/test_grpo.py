"""Tests for GRPO: group advantages and the loss against numpy, and the k3 estimator."""
import statistics

import jax
import numpy as np
import pytest

from chorus.learners import grpo

B, T = 6, 7


def test_group_advantages_match_a_loop_over_groups():
  rng = np.random.default_rng(0)
  rewards = rng.uniform(size=(5, 8))
  rewards[1] = 0.25  # Equal rewards: no signal.
  rewards[2, :4], rewards[2, 4:] = 0.0, 1.0
  advantages = grpo.group_advantages(rewards, epsilon=1e-4)
  for group, group_advantages in zip(rewards, advantages):
    mean, std = statistics.fmean(group), statistics.pstdev(group)
    np.testing.assert_allclose(group_advantages, [(r - mean) / (std + 1e-4) for r in group],
                               rtol=1e-12)
  np.testing.assert_array_equal(advantages[1], 0.0)
  np.testing.assert_allclose(advantages[2], np.repeat([-1.0, 1.0], 4) / (1 + 2e-4), rtol=1e-9)


def test_group_advantage_epsilon_bounds_a_near_constant_group():
  rewards = np.array([[0.5, 0.5, 0.5, 0.5 + 1e-6]])
  big = grpo.group_advantages(rewards, epsilon=1.0)
  small = grpo.group_advantages(rewards, epsilon=1e-9)
  assert np.abs(big).max() < 1e-5 < 1.0 < np.abs(small).max()
  with pytest.raises(ValueError, match=r'\[groups, group_size\]'):
    grpo.group_advantages(np.zeros(4), epsilon=1e-4)
  with pytest.raises(ValueError, match='epsilon must be > 0'):
    grpo.group_advantages(rewards, epsilon=0.0)


def test_k3_is_non_negative_zero_at_the_reference_and_unbiased_for_kl():
  rng = np.random.default_rng(1)
  policy = rng.dirichlet(np.ones(6))
  reference = rng.dirichlet(np.ones(6))
  k3 = np.asarray(grpo.k3_kl(np.log(policy), np.log(reference)), np.float64)
  assert np.all(k3 >= 0)
  # Expectation under pi, by enumeration, is KL(pi || pi_ref).
  np.testing.assert_allclose(np.sum(policy * k3), np.sum(policy * np.log(policy / reference)),
                             rtol=1e-5)
  np.testing.assert_array_equal(grpo.k3_kl(np.log(policy), np.log(policy)), 0.0)


def _inputs(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = np.arange(T)[None, :] < lengths[:, None]
  logprobs = np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32)
  return dict(
      logprobs=logprobs,
      # Spread enough that the clip binds on both sides.
      behaviour_logprobs=np.where(mask, logprobs + rng.normal(scale=0.3, size=(B, T)),
                                  np.nan).astype(np.float32),
      reference_logprobs=np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(
          np.float32),
      advantages=np.array([1.5, -0.7, 0.0, 2.0, -1.2, 0.4], np.float32),
      mask=mask)


def _numpy_loss_and_grad(inputs, clip_epsilon, kl_coef, normalisation):
  mask = inputs['mask']
  logprobs, behaviour, reference = (np.where(mask, np.asarray(inputs[name], np.float64), 0.0)
                                    for name in ('logprobs', 'behaviour_logprobs',
                                                 'reference_logprobs'))
  advantages = np.asarray(inputs['advantages'], np.float64)[:, None]
  ratios = np.exp(logprobs - behaviour)
  unclipped, clipped = ratios * advantages, np.clip(ratios, 1 - clip_epsilon,
                                                    1 + clip_epsilon) * advantages
  kl = np.exp(reference - logprobs) - (reference - logprobs) - 1
  per_token = -np.minimum(unclipped, clipped) + kl_coef * kl
  # d/dlogpi: -r A where the unclipped term is the smaller (else 0), + beta (1 - pi_ref/pi).
  grad = -np.where(unclipped <= clipped, ratios * advantages, 0.0) + kl_coef * (
      1 - np.exp(reference - logprobs))
  if normalisation == 'sequence':
    weights = 1.0 / (mask.sum(axis=1, keepdims=True) * mask.shape[0])
  else:
    weights = np.full(mask.shape, 1.0 / mask.sum())
  weights = np.where(mask, weights, 0.0)
  return np.sum(weights * per_token), weights * grad


@pytest.mark.parametrize('normalisation', ['sequence', 'token'])
@pytest.mark.parametrize('kl_coef', [0.0, 0.04, 0.5])
def test_grpo_loss_matches_numpy_in_value_and_gradient(normalisation, kl_coef):
  inputs = _inputs(seed=2)
  expected, expected_grad = _numpy_loss_and_grad(inputs, 0.2, kl_coef, normalisation)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: grpo.grpo_loss(**{**inputs, 'logprobs': lp}, clip_epsilon=0.2,
                                kl_coef=kl_coef, normalisation=normalisation),
      has_aux=True)(inputs['logprobs'])
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
  assert 0 < metrics['clip_fraction'] < 1
  np.testing.assert_allclose(metrics['zero_advantage_fraction'], 1 / B)
  assert all(np.isfinite(value) for value in metrics.values())


def test_normalisations_differ_when_lengths_differ():
  inputs = _inputs(seed=3)
  losses = [grpo.grpo_loss(**inputs, normalisation=n)[0] for n in grpo.NORMALISATIONS]
  assert abs(losses[0] - losses[1]) > 1e-3


def test_grpo_reference_and_advantages_get_no_gradient():
  inputs = {name: np.nan_to_num(value) if name != 'mask' else value
            for name, value in _inputs(seed=4).items()}
  grads = jax.grad(lambda behaviour, reference, advantages: grpo.grpo_loss(
      **{**inputs, 'behaviour_logprobs': behaviour, 'reference_logprobs': reference,
         'advantages': advantages})[0], argnums=(1, 2))(
             inputs['behaviour_logprobs'], inputs['reference_logprobs'], inputs['advantages'])
  for grad in grads:
    np.testing.assert_array_equal(grad, 0.0)


def test_grpo_loss_checks_its_arguments():
  inputs = _inputs(seed=5)
  with pytest.raises(ValueError, match="normalisation must be one of"):
    grpo.grpo_loss(**inputs, normalisation='group')
  with pytest.raises(ValueError, match='kl_coef must be >= 0'):
    grpo.grpo_loss(**inputs, kl_coef=-0.1)
  with pytest.raises(AssertionError):
    grpo.grpo_loss(**{**inputs, 'advantages': inputs['advantages'][:-1]})
