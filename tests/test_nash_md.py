"""Tests for Nash-MD-PG: the loss against numpy, and convergence on a preference game."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners import nash_md

B, T = 5, 6

# A non-transitive game: 0 beats 1, 1 beats 2, 2 beats 0; P + P^T = 1.
_ADVANTAGE = np.array([[0.0, 0.3, -0.2], [-0.3, 0.0, 0.4], [0.2, -0.4, 0.0]])
PREFERENCES = 0.5 + _ADVANTAGE
REFERENCE = np.array([0.6, 0.3, 0.1])
TAU = 0.2


def _loss_inputs(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = np.arange(T)[None, :] < lengths[:, None]
  return dict(
      logprobs=np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32),
      reference_logprobs=np.where(mask, -rng.exponential(size=(B, T)), -np.inf).astype(
          np.float32),
      preferences=rng.uniform(size=B).astype(np.float32),
      mask=mask)


@pytest.mark.parametrize('kl_coef', [0.0, 0.05, 0.5])
def test_nash_md_loss_matches_numpy_in_value_and_gradient(kl_coef):
  inputs = _loss_inputs(seed=1)
  mask = inputs['mask']
  logprobs = np.where(mask, inputs['logprobs'], 0.0).astype(np.float64)
  log_ratios = np.where(mask, logprobs - inputs['reference_logprobs'], 0.0)
  score = inputs['preferences'] - 0.5
  expected = np.mean(kl_coef * np.sum(log_ratios * logprobs, 1) - score * logprobs.sum(1))
  expected_grad = np.where(mask, (kl_coef * log_ratios - score[:, None]) / B, 0.0)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: nash_md.nash_md_loss(**{**inputs, 'logprobs': lp}, kl_coef=kl_coef),
      has_aux=True)(inputs['logprobs'])
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['kl_to_reference'], log_ratios.sum(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['preference'], inputs['preferences'].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['completion_length'], mask.sum(1).mean())
  assert all(np.isfinite(value) for value in metrics.values())


def test_reference_logprobs_get_no_gradient():
  inputs = _loss_inputs(seed=2)
  grad = jax.grad(lambda ref: nash_md.nash_md_loss(
      **{**inputs, 'reference_logprobs': ref}, kl_coef=0.3)[0])(inputs['reference_logprobs'])
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('mixture_coef', [0.0, 0.25, 0.7, 1.0])
def test_geometric_mixture_is_the_normalised_geometric_mean(mixture_coef):
  rng = np.random.default_rng(3)
  policy_logits = rng.normal(scale=2.0, size=(2, 3, 7))
  reference_logits = rng.normal(scale=2.0, size=(2, 3, 7)) + 5.0  # Unnormalised.
  policy = np.exp(policy_logits) / np.exp(policy_logits).sum(-1, keepdims=True)
  reference = np.exp(reference_logits) / np.exp(reference_logits).sum(-1, keepdims=True)
  geometric = policy ** (1 - mixture_coef) * reference ** mixture_coef
  expected = geometric / geometric.sum(-1, keepdims=True)
  result = nash_md.geometric_mixture_logits(policy_logits, reference_logits, mixture_coef)
  np.testing.assert_allclose(np.exp(result), expected, rtol=1e-5, atol=1e-7)
  # Mixing raw logits gives the same distribution.
  np.testing.assert_allclose(
      result, jax.nn.log_softmax((1 - mixture_coef) * policy_logits
                                 + mixture_coef * reference_logits), atol=1e-5)


def _regularised_best_response_fixed_point(mixture_coef):
  """Solves pi = softmax(log pi_ref + P(., pi^beta) / tau) by damped iteration.

  At mixture_coef = 0 this is the regularised Nash equilibrium
  argmax_pi min_pi' P(pi > pi') - tau KL(pi || ref) + tau KL(pi' || ref).
  """
  pi = np.full(3, 1 / 3)
  for _ in range(20000):
    mixture = pi ** (1 - mixture_coef) * REFERENCE ** mixture_coef
    mixture /= mixture.sum()
    best_response = REFERENCE * np.exp(PREFERENCES @ mixture / TAU)
    pi = 0.9 * pi + 0.1 * best_response / best_response.sum()
  mixture = pi ** (1 - mixture_coef) * REFERENCE ** mixture_coef
  mixture /= mixture.sum()
  best_response = REFERENCE * np.exp(PREFERENCES @ mixture / TAU)
  np.testing.assert_allclose(pi, best_response / best_response.sum(), atol=1e-10)
  return pi


def _run_nash_md_pg(mixture_coef, kl_coef, steps=3000, learning_rate=1.0):
  """Gradient descent on logits with the exact expectation of nash_md_loss.

  Each (y, y') pair is one single-token row, weighted by pi(y) * pi^beta(y') as if
  y ~ pi_theta and y' ~ the geometric mixture (the weights are constants, like
  samples).
  """
  log_reference = jnp.log(jnp.asarray(REFERENCE))
  ys, opponents = (a.ravel() for a in jnp.meshgrid(jnp.arange(3), jnp.arange(3),
                                                   indexing='ij'))

  def expected_loss(logits):
    logprobs = jax.nn.log_softmax(logits)
    opponent = jnp.exp(nash_md.geometric_mixture_logits(logits, log_reference,
                                                         mixture_coef))
    weights = jax.lax.stop_gradient(jnp.exp(logprobs)[ys] * opponent[opponents])
    per_pair = jax.vmap(lambda y, o: nash_md.nash_md_loss(
        logprobs[y].reshape(1, 1), log_reference[y].reshape(1, 1),
        jnp.asarray(PREFERENCES)[y, o][None], jnp.ones((1, 1), bool),
        kl_coef=kl_coef)[0])(ys, opponents)
    return jnp.sum(weights * per_pair)

  step = jax.jit(lambda z: z - learning_rate * jax.grad(expected_loss)(z))
  logits = jnp.zeros(3)
  for _ in range(steps):
    logits = step(logits)
  return np.asarray(jax.nn.softmax(logits))


def test_self_play_nash_md_pg_converges_to_the_regularised_nash_equilibrium():
  equilibrium = _regularised_best_response_fixed_point(mixture_coef=0.0)
  # The equilibrium is far from both the reference and uniform play, so a sign
  # error in either term lands elsewhere.
  assert np.abs(equilibrium - REFERENCE).max() > 0.1
  assert np.abs(equilibrium - 1 / 3).max() > 0.1
  np.testing.assert_allclose(_run_nash_md_pg(0.0, TAU), equilibrium, atol=2e-3)


def test_mixture_opponent_converges_to_its_own_fixed_point_near_the_equilibrium():
  # With y' from pi^beta the stationary point solves pi = softmax(log ref +
  # P(., pi^beta) / tau): beta moves the limit (by O(beta)), not only the speed.
  equilibrium = _regularised_best_response_fixed_point(mixture_coef=0.0)
  mixture_fixed_point = _regularised_best_response_fixed_point(mixture_coef=0.25)
  result = _run_nash_md_pg(0.25, TAU)
  np.testing.assert_allclose(result, mixture_fixed_point, atol=2e-3)
  assert np.abs(mixture_fixed_point - equilibrium).max() > 0.01
  assert np.abs(result - equilibrium).max() < 0.1


@pytest.mark.parametrize('overrides, error, match', [
    ({'reference_logprobs': np.zeros((B, T - 1))}, AssertionError, 'different shapes'),
    ({'mask': np.ones(T, bool)}, AssertionError, 'rank 1'),
    ({'preferences': np.zeros((B, 1))}, AssertionError, 'rank 2'),
    ({'kl_coef': -1.0}, ValueError, 'kl_coef'),
])
def test_nash_md_loss_rejects_bad_inputs(overrides, error, match):
  inputs = {**_loss_inputs(seed=4), 'kl_coef': 0.1, **overrides}
  with pytest.raises(error, match=match):
    nash_md.nash_md_loss(**inputs)


@pytest.mark.parametrize('args, error, match', [
    ((np.zeros((2, 3)), np.zeros((2, 4)), 0.5), AssertionError, 'different shapes'),
    ((np.zeros(()), np.zeros(()), 0.5), AssertionError, 'shape ()'),
    ((np.zeros(3), np.zeros(3), 1.5), ValueError, 'mixture_coef'),
])
def test_geometric_mixture_rejects_bad_inputs(args, error, match):
  with pytest.raises(error, match=re.escape(match)):
    nash_md.geometric_mixture_logits(*args)
