"""Tests for BOND / J-BOND: the Best-of-N closed form and the J-BOND loss."""
import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chorus.learners import bond

B, T, T2 = 5, 6, 4
REFERENCE = np.array([0.5, 0.3, 0.2])
REWARDS = np.array([0.0, 1.0, 2.0])
BEST_OF_TWO = np.array([0.25, 0.39, 0.36])


def test_best_of_two_matches_the_paper_example():
  np.testing.assert_allclose(bond.best_of_n_distribution(REFERENCE, REWARDS, 2),
                             BEST_OF_TWO, atol=1e-6)
  np.testing.assert_allclose(bond.best_of_n_distribution(REFERENCE, REWARDS, 1),
                             REFERENCE, atol=1e-6)


def _enumerated_best_of_n(probs, rewards, n):
  """Sums over all K^n draws; ties go uniformly to one of the tied draws."""
  result = np.zeros(len(probs))
  for draws in itertools.product(range(len(probs)), repeat=n):
    probability = np.prod(probs[list(draws)])
    best = max(rewards[d] for d in draws)
    winners = [d for d in draws if rewards[d] == best]
    for d in winners:
      result[d] += probability / len(winners)
  return result


@pytest.mark.parametrize('n', [1, 2, 3, 4])
@pytest.mark.parametrize('rewards', [[0.3, -1.0, 2.0, 0.7], [1.0, 0.0, 1.0, -2.0]])
def test_best_of_n_matches_enumeration_of_draws_with_and_without_ties(n, rewards):
  probs = np.random.default_rng(n).dirichlet(np.ones(4))
  rewards = np.array(rewards)
  result = bond.best_of_n_distribution(probs, rewards, n)
  np.testing.assert_allclose(result, _enumerated_best_of_n(probs, rewards, n), atol=1e-6)
  np.testing.assert_allclose(np.sum(result), 1.0, atol=1e-6)


def test_binary_reward_penalises_only_losing_to_both_anchors():
  reward = np.array([0.0, 1.0, 2.0, 1.0])
  anchors = np.array([[1.0, 2.0], [0.5, 3.0], [2.0, 2.0], [1.0, 1.5]])
  win_probability = np.mean(anchors <= reward[:, None], axis=1)  # What the actors record.
  np.testing.assert_allclose(bond.jbond_binary_reward(win_probability),
                             [-math.log(16.0), 0.0, 0.0, 0.0], rtol=1e-6)


def _jbond_inputs(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = np.arange(T)[None, :] < lengths[:, None]
  best_lengths = rng.integers(1, T2 + 1, size=B)
  best_mask = np.arange(T2)[None, :] < best_lengths[:, None]
  policy = -rng.exponential(size=(B, T))
  anchor = -rng.exponential(size=(B, T))
  best = -rng.exponential(size=(B, T2))
  binary = np.where(rng.uniform(size=B) < 0.4, -math.log(16.0), 0.0)
  return dict(
      policy_logprobs=np.where(mask, policy, np.nan).astype(np.float32),
      anchor_logprobs=np.where(mask, anchor, -np.inf).astype(np.float32),
      best_anchor_logprobs=np.where(best_mask, best, np.nan).astype(np.float32),
      mask=mask, best_anchor_mask=best_mask, binary_reward=binary.astype(np.float32))


def _numpy_jbond(inputs, beta, kl_coef, baseline):
  """Loss value and its gradients w.r.t. the policy and best-anchor log-probs."""
  mask, best_mask = inputs['mask'], inputs['best_anchor_mask']
  policy = np.where(mask, inputs['policy_logprobs'], 0.0).astype(np.float64)
  anchor = np.where(mask, inputs['anchor_logprobs'], 0.0).astype(np.float64)
  best = np.where(best_mask, inputs['best_anchor_logprobs'], 0.0).astype(np.float64)
  forward = -best.sum(1).mean()
  log_ratio = policy - anchor
  returns = inputs['binary_reward'] - log_ratio.sum(1)
  baselines = {'mean': np.full(B, returns.mean()), 'none': np.zeros(B),
               'leave_one_out': (returns.sum() - returns) / (B - 1)}[baseline]
  advantages = returns - baselines
  backward = -(policy.sum(1) * advantages).mean()
  reg = log_ratio.sum(1).mean()
  loss = (1 - beta) * forward + beta * backward + kl_coef * reg
  to_go = np.array([[log_ratio[b, t:].sum() for t in range(T)] for b in range(B)])
  policy_grad = np.where(mask, (-beta * advantages[:, None] + kl_coef * to_go) / B, 0.0)
  best_grad = np.where(best_mask, -(1 - beta) / B, 0.0)
  return loss, policy_grad, best_grad, returns


@pytest.mark.parametrize('beta, kl_coef, baseline', [
    (0.5, 0.0, 'mean'), (0.5, 1.0, 'mean'), (0.3, 2.0, 'leave_one_out'), (1.0, 0.5, 'none'),
    (0.0, 0.0, 'mean')])
def test_jbond_loss_matches_numpy_in_value_and_gradient(beta, kl_coef, baseline):
  inputs = _jbond_inputs(seed=1)
  expected, policy_grad, best_grad, returns = _numpy_jbond(inputs, beta, kl_coef, baseline)
  loss_fn = functools.partial(bond.jbond_loss, beta=beta, kl_coef=kl_coef, baseline=baseline)
  (loss, metrics), grads = jax.value_and_grad(
      lambda p, a, b: loss_fn(**{**inputs, 'policy_logprobs': p, 'anchor_logprobs': a,
                                 'best_anchor_logprobs': b}),
      argnums=(0, 1, 2), has_aux=True)(inputs['policy_logprobs'], inputs['anchor_logprobs'],
                                       inputs['best_anchor_logprobs'])
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[0], policy_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[1], 0.0)  # The anchor is a constant.
  np.testing.assert_allclose(grads[2], best_grad, rtol=1e-6)
  np.testing.assert_allclose(metrics['backward_reward'], returns.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['win_rate'],
                             np.mean(inputs['binary_reward'] == 0.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['policy_length'], inputs['mask'].sum(1).mean())
  assert all(np.isfinite(value) for value in metrics.values())


def test_raising_the_best_anchor_likelihood_lowers_the_forward_loss():
  inputs = _jbond_inputs(seed=2)

  def losses(best_logprobs):
    _, metrics = bond.jbond_loss(**{**inputs, 'best_anchor_logprobs': best_logprobs})
    return metrics['forward_nll']

  grad = jax.grad(lambda b: bond.jbond_loss(**{**inputs, 'best_anchor_logprobs': b})[0])(
      inputs['best_anchor_logprobs'])
  assert np.all(grad[inputs['best_anchor_mask']] < 0.0)
  assert np.all(grad[~inputs['best_anchor_mask']] == 0.0)
  raised = np.where(inputs['best_anchor_mask'], inputs['best_anchor_logprobs'] + 0.1, np.nan)
  assert losses(raised.astype(np.float32)) < losses(inputs['best_anchor_logprobs'])


def test_kl_regulariser_gradient_is_unbiased_for_the_sequence_kl():
  # Two-token sequences over 3 symbols, enumerated: the pi-weighted expectation of
  # the regulariser's gradient is the gradient of the exact KL(pi || anchor).
  rng = np.random.default_rng(3)
  anchor_first, anchor_second = rng.normal(size=3), rng.normal(size=(3, 3))
  sequences = np.array(list(itertools.product(range(3), repeat=2)))

  def token_logprobs(first, second):
    return jnp.stack([jax.nn.log_softmax(first)[sequences[:, 0]],
                      jax.nn.log_softmax(second, -1)[sequences[:, 0], sequences[:, 1]]], 1)

  anchor_logprobs = token_logprobs(anchor_first, anchor_second)

  def expected_reg(params):
    logprobs = token_logprobs(*params)
    weights = jax.lax.stop_gradient(jnp.exp(logprobs.sum(1)))
    per_sequence = jax.vmap(lambda lp, alp: bond.jbond_loss(
        lp[None], alp[None], jnp.zeros((1, 1)), jnp.ones((1, 2), bool),
        jnp.ones((1, 1), bool), jnp.zeros(1), beta=0.0, kl_coef=1.0)[0])(
            logprobs, anchor_logprobs)
    return jnp.sum(weights * per_sequence)

  def exact_kl(params):
    logprobs = token_logprobs(*params).sum(1)
    return jnp.sum(jnp.exp(logprobs) * (logprobs - anchor_logprobs.sum(1)))

  params = (jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=(3, 3))))
  np.testing.assert_allclose(expected_reg(params), exact_kl(params), rtol=1e-5)
  for got, want in zip(jax.grad(expected_reg)(params), jax.grad(exact_kl)(params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _bandit_jbond_loss(logits, answers, best_answers, rewards_to_pass, baseline):
  """jbond_loss on one-token answers with the anchor fixed at the reference."""
  logprobs = jax.nn.log_softmax(logits)
  ones = jnp.ones((answers.shape[0], 1), bool)
  return bond.jbond_loss(
      logprobs[answers][:, None], jnp.log(REFERENCE)[answers][:, None],
      logprobs[best_answers][:, None], ones, ones, rewards_to_pass,
      beta=0.5, kl_coef=0.0, baseline=baseline)[0]


def test_expected_jbond_gradient_is_the_jeffreys_gradient_and_descends_to_best_of_two():
  # Exact expectation: y ~ pi over the 3 answers, y'_best ~ Best-of-2 of the anchor,
  # backward reward log(pi_BoN / pi_ref) with beta_BOND = 1 / (N - 1) = 1.
  best_of_two = bond.best_of_n_distribution(REFERENCE, REWARDS, 2)
  answers = jnp.arange(3)
  reward = jnp.log(best_of_two / REFERENCE)

  def expected_loss(logits):
    per_pair = jax.vmap(lambda y, best: _bandit_jbond_loss(
        logits, y[None], best[None], reward[y][None], 'none'))
    ys, bests = jnp.meshgrid(answers, answers, indexing='ij')
    weights = jax.nn.softmax(logits)[:, None] * best_of_two[None, :]
    return jnp.sum(jax.lax.stop_gradient(weights) * per_pair(ys.ravel(), bests.ravel())
                   .reshape(3, 3))

  def jeffreys(logits, beta=0.5):
    log_pi = jax.nn.log_softmax(logits)
    forward_kl = jnp.sum(best_of_two * (jnp.log(best_of_two) - log_pi))
    backward_kl = jnp.sum(jnp.exp(log_pi) * (log_pi - jnp.log(best_of_two)))
    return (1 - beta) * forward_kl + beta * backward_kl

  logits = jnp.array([0.3, -1.0, 0.8])
  np.testing.assert_allclose(jax.grad(expected_loss)(logits), jax.grad(jeffreys)(logits),
                             rtol=1e-5, atol=1e-6)
  step = jax.jit(lambda z: z - 1.0 * jax.grad(expected_loss)(z))
  logits = jnp.log(jnp.asarray(REFERENCE))
  for _ in range(300):
    logits = step(logits)
  np.testing.assert_allclose(jax.nn.softmax(logits), BEST_OF_TWO, atol=1e-3)


def test_sampled_bond_on_best_of_two_samples_converges_to_best_of_two():
  # The estimator the learner runs: y ~ pi, two anchor (= reference) samples whose
  # better one is the forward MLE target, and a backward policy gradient whose reward
  # is log(p_le + p_lt) estimated from reference samples (log pi_BoN / pi_ref at N = 2).
  num_samples, num_reference = 4096, 2048
  schedule = optax.exponential_decay(0.05, transition_steps=100, decay_rate=0.5)
  optimizer = optax.adam(schedule)

  @jax.jit
  def update(logits, opt_state, key):
    policy_key, anchor_key, reference_key = jax.random.split(key, 3)
    answers = jax.random.categorical(policy_key, logits, shape=(num_samples,))
    anchors = jax.random.categorical(anchor_key, jnp.log(REFERENCE), shape=(2, num_samples))
    best_answers = jnp.max(anchors, axis=0)  # Rewards increase with the index.
    reference = jax.random.categorical(reference_key, jnp.log(REFERENCE),
                                       shape=(num_reference,))
    reference_rewards = jnp.asarray(REWARDS)[reference]
    answer_rewards = jnp.asarray(REWARDS)[answers]
    p_le = jnp.mean(reference_rewards[None, :] <= answer_rewards[:, None], axis=1)
    p_lt = jnp.mean(reference_rewards[None, :] < answer_rewards[:, None], axis=1)
    reward = jnp.log(jnp.maximum(p_le + p_lt, 1.0 / num_reference))
    grads = jax.grad(_bandit_jbond_loss)(logits, answers, best_answers, reward,
                                         'leave_one_out')
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(logits, updates), opt_state

  logits = jnp.log(jnp.asarray(REFERENCE, jnp.float32))
  opt_state = optimizer.init(logits)
  keys = jax.random.split(jax.random.PRNGKey(0), 600)
  history = []
  for key in keys:
    logits, opt_state = update(logits, opt_state, key)
    history.append(jax.nn.softmax(logits))
  np.testing.assert_allclose(np.mean(history[-100:], axis=0), BEST_OF_TWO, atol=0.01)


@pytest.mark.parametrize('overrides, match', [
    ({'policy_logprobs': np.zeros((B, T - 1))}, 'different shapes'),
    ({'mask': np.ones(T, bool)}, 'rank 1'),
    ({'best_anchor_mask': np.ones((B, T2 + 1), bool)}, 'different shapes'),
    ({'best_anchor_logprobs': np.zeros((B + 1, T2)),
      'best_anchor_mask': np.ones((B + 1, T2), bool)}, re.escape(f'expected ({B}, None)')),
    ({'binary_reward': np.zeros((B, 1))}, re.escape(f'rank 2 (shape {(B, 1)})')),
])
def test_jbond_loss_rejects_bad_shapes(overrides, match):
  with pytest.raises(AssertionError, match=match):
    bond.jbond_loss(**{**_jbond_inputs(seed=4), **overrides})


@pytest.mark.parametrize('overrides, match', [
    ({'beta': 1.5}, 'beta'),
    ({'kl_coef': -0.1}, 'kl_coef'),
    ({'baseline': 'median'}, 'baseline'),
])
def test_jbond_loss_rejects_bad_hyperparameters(overrides, match):
  with pytest.raises(ValueError, match=match):
    bond.jbond_loss(**{**_jbond_inputs(seed=4), **overrides})


@pytest.mark.parametrize('args, error, match', [
    ((REFERENCE, REWARDS[:2], 2), AssertionError, 'different shapes'),
    ((REFERENCE[None], REWARDS, 2), AssertionError, 'rank 2'),
    ((REFERENCE, REWARDS, 0), ValueError, 'positive integer'),
])
def test_best_of_n_rejects_bad_inputs(args, error, match):
  with pytest.raises(error, match=match):
    bond.best_of_n_distribution(*args)


def test_binary_reward_rejects_a_batch_of_the_wrong_rank():
  with pytest.raises(AssertionError, match='rank 2'):
    bond.jbond_binary_reward(np.zeros((3, 2)))
