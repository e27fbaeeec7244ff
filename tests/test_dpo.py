"""Tests for DPO and IPO: against numpy, DPO's small-beta limit and IPO's fixed point.

DPO's small-beta limit, derived: softplus(-beta h) = log 2 - beta h / 2 + beta^2 h^2 / 8
+ O(beta^4), so the loss tends to log 2 and (loss - log 2) / beta to -h / 2; its gradient
-beta sigmoid(-beta h) grad h = -(beta / 2) grad h + O(beta^2): at small beta every pair
pushes its margin up with the same weight beta / 2, whatever the margin already is.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners import dpo

B, T = 5, 6


def _pairs(seed):
  rng = np.random.default_rng(seed)

  def completion():
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    return (np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32),
            np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32), mask)

  return completion(), completion()


def _log_ratios(logprobs, reference_logprobs, mask):
  return dpo.sequence_log_ratios(logprobs, reference_logprobs, mask)


def test_sequence_log_ratios_sum_real_tokens_and_ignore_nan_padding():
  (logprobs, reference, mask), _ = _pairs(seed=0)
  expected = [np.sum(logprobs[b][mask[b]].astype(np.float64) - reference[b][mask[b]])
              for b in range(B)]
  np.testing.assert_allclose(_log_ratios(logprobs, reference, mask), expected, rtol=1e-5)
  grad_policy, grad_reference = jax.grad(
      lambda lp, ref: _log_ratios(lp, ref, mask).sum(), argnums=(0, 1))(logprobs, reference)
  np.testing.assert_array_equal(grad_policy, mask.astype(np.float32))
  np.testing.assert_array_equal(grad_reference, 0.0)  # The reference is frozen.


@pytest.mark.parametrize('beta', [0.05, 0.5, 3.0])
def test_dpo_loss_matches_numpy_in_value_and_gradient(beta):
  rng = np.random.default_rng(1)
  chosen, rejected = rng.normal(scale=3.0, size=(2, B)).astype(np.float32)
  margins = chosen.astype(np.float64) - rejected
  expected = np.mean(np.log1p(np.exp(-beta * margins)))
  expected_grad = -beta / (1 + np.exp(beta * margins)) / B  # d loss / d chosen_b.
  (loss, metrics), (grad_chosen, grad_rejected) = jax.value_and_grad(
      lambda c, r: dpo.dpo_loss(c, r, beta=beta), argnums=(0, 1), has_aux=True)(chosen,
                                                                               rejected)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(grad_chosen, expected_grad, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(grad_rejected, -expected_grad, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(metrics['margin'], margins.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['pair_accuracy'], np.mean(margins > 0))


@pytest.mark.parametrize('beta', [1e-2, 1e-3])
def test_dpo_small_beta_limit_is_log_two_minus_half_the_margin(beta):
  (chosen_lp, chosen_ref, chosen_mask), (rejected_lp, rejected_ref, rejected_mask) = _pairs(2)

  def loss(chosen_logprobs, rejected_logprobs):
    return dpo.dpo_loss(_log_ratios(chosen_logprobs, chosen_ref, chosen_mask),
                        _log_ratios(rejected_logprobs, rejected_ref, rejected_mask),
                        beta=beta)[0]

  margins = (np.asarray(_log_ratios(chosen_lp, chosen_ref, chosen_mask))
             - np.asarray(_log_ratios(rejected_lp, rejected_ref, rejected_mask)))
  value = loss(chosen_lp, rejected_lp)
  # The remainder is beta^2 h^2 / 8 at most (for these margins of a few nats).
  bound = beta ** 2 * np.max(margins ** 2) / 8 + 1e-6
  assert abs(value - (math.log(2) - beta * margins.mean() / 2)) <= bound
  grad_chosen, grad_rejected = jax.grad(loss, argnums=(0, 1))(chosen_lp, rejected_lp)
  # grad h w.r.t. a real token's log-prob is +1 (chosen) or -1 (rejected), so the
  # gradient tends to -beta / 2 / B and +beta / 2 / B there, and 0 on padding.
  tolerance = beta ** 2 * np.max(np.abs(margins)) / 4 / B + 1e-9
  np.testing.assert_allclose(grad_chosen, np.where(chosen_mask, -beta / 2 / B, 0.0),
                             atol=tolerance, rtol=0)
  np.testing.assert_allclose(grad_rejected, np.where(rejected_mask, beta / 2 / B, 0.0),
                             atol=tolerance, rtol=0)


def test_ipo_loss_matches_numpy_and_its_minimum_is_at_the_target_margin():
  rng = np.random.default_rng(3)
  chosen, rejected = rng.normal(size=(2, B)).astype(np.float32)
  tau = 0.25
  margins = chosen.astype(np.float64) - rejected
  (loss, _), grad = jax.value_and_grad(lambda c: dpo.ipo_loss(c, rejected, tau=tau),
                                       has_aux=True)(chosen)
  np.testing.assert_allclose(loss, np.mean((margins - 2.0) ** 2), rtol=1e-5)
  np.testing.assert_allclose(grad, 2 * (margins - 2.0) / B, rtol=1e-4)
  # At h = 1 / (2 tau) the loss is 0 and so is its gradient; either side it rises.
  at_target = rejected + 1 / (2 * tau)
  (loss, _), grad = jax.value_and_grad(lambda c: dpo.ipo_loss(c, rejected, tau=tau),
                                       has_aux=True)(at_target)
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  for shift in (-0.1, 0.1):
    assert dpo.ipo_loss(at_target + shift, rejected, tau=tau)[0] > 1e-3


def test_ipo_descent_on_a_tabular_policy_reaches_the_target_margin_and_dpo_does_not_stop():
  # Three one-token answers, a uniform reference, one pair: answer 0 preferred to 1.
  reference = jnp.log(jnp.full(3, 1 / 3))
  tau = 0.5

  def margin(logits):
    log_pi = jax.nn.log_softmax(logits)
    return (log_pi[0] - reference[0]) - (log_pi[1] - reference[1])

  def train(loss):
    logits = jnp.zeros(3)
    step = jax.jit(jax.grad(lambda l: loss(margin(l)[None], jnp.zeros(1))[0]))
    for _ in range(2000):
      logits = logits - 0.1 * step(logits)
    return float(margin(logits))

  assert train(lambda c, r: dpo.ipo_loss(c, r, tau=tau)) == pytest.approx(1 / (2 * tau),
                                                                          abs=1e-4)
  assert train(lambda c, r: dpo.dpo_loss(c, r, beta=1.0)) > 2 / (2 * tau)


def test_losses_check_their_arguments():
  with pytest.raises(ValueError, match='beta must be > 0'):
    dpo.dpo_loss(np.zeros(2), np.zeros(2), beta=0.0)
  with pytest.raises(ValueError, match='tau must be > 0'):
    dpo.ipo_loss(np.zeros(2), np.zeros(2), tau=-1.0)
  with pytest.raises(AssertionError):
    dpo.dpo_loss(np.zeros(2), np.zeros(3), beta=0.1)
