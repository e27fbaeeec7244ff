"""Tests for the soft Q-learning losses, against float64 loops of their definitions."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chorus.learners import soft_q
from chorus.learners import supervised

B, T, V = 6, 7, 5


def _padded_layout(seed):
  """Random lengths (one row of length 1, one full), a mix of terminated rows."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0], lengths[1], lengths[2] = 1, T, T
  terminated = rng.uniform(size=B) < 0.5
  terminated[0], terminated[1], terminated[2] = True, False, True
  mask = np.arange(T)[None, :] < lengths[:, None]
  return lengths, mask, terminated


def _demonstrations(seed):
  """Logits [B, T + 1, V] and demonstrated tokens [B, T]."""
  rng = np.random.default_rng(seed + 100)
  logits = rng.normal(scale=2.0, size=(B, T + 1, V)).astype(np.float32)
  actions = rng.integers(0, V, size=(B, T))
  return logits, actions


def _taken(logits, actions):
  return jnp.take_along_axis(logits[:, :T], actions[..., None], axis=-1)[..., 0]


def test_soft_values_are_logsumexp_of_logits():
  logits, _ = _demonstrations(seed=0)
  np.testing.assert_allclose(
      soft_q.soft_values(logits),
      np.log(np.exp(logits.astype(np.float64)).sum(-1)), rtol=1e-6)
  with pytest.raises(AssertionError, match='expected 3'):
    soft_q.soft_values(logits[0])


@pytest.mark.parametrize('seed', [1, 2])
def test_inverse_soft_q_without_td_term_is_token_nll_in_value_and_gradient(seed):
  logits, actions = _demonstrations(seed)
  _, mask, terminated = _padded_layout(seed)

  def iq_loss(logits):
    return soft_q.inverse_soft_q_loss(
        _taken(logits, actions), soft_q.soft_values(logits), mask, terminated,
        td_coef=0.0)[0]

  def mle_loss(logits):
    logprobs = _taken(jax.nn.log_softmax(logits), actions)
    return supervised.token_nll(logprobs, jnp.asarray(mask))[0]

  iq_value, iq_grad = jax.value_and_grad(iq_loss)(logits)
  mle_value, mle_grad = jax.value_and_grad(mle_loss)(logits)
  np.testing.assert_allclose(iq_value, mle_value, rtol=1e-6)
  np.testing.assert_allclose(iq_grad, mle_grad, rtol=1e-5, atol=1e-7)
  # The padded positions and the unused bootstrap slots get exactly no gradient.
  assert np.all(iq_grad[:, :T][~mask] == 0.0)


def _inverse_soft_q_loop(q_taken, values, lengths, terminated, td_coef, discount):
  q_taken, values = np.float64(q_taken), np.float64(values)
  total, count = 0.0, 0
  for b, length in enumerate(lengths):
    for t in range(length):
      next_value = 0.0 if (t == length - 1 and terminated[b]) else values[b, t + 1]
      log_pi = q_taken[b, t] - values[b, t]
      implied_reward = q_taken[b, t] - discount * next_value
      total += -log_pi + td_coef * implied_reward ** 2
      count += 1
  return total / count


@pytest.mark.parametrize('td_coef, discount', [(0.1, 1.0), (0.5, 0.9), (2.0, 0.0)])
def test_inverse_soft_q_matches_loop_and_ignores_nan_padding(td_coef, discount):
  logits, actions = _demonstrations(seed=3)
  lengths, mask, terminated = _padded_layout(seed=3)
  q_taken = np.asarray(_taken(logits, actions))
  values = np.asarray(soft_q.soft_values(logits))
  expected = _inverse_soft_q_loop(q_taken, values, lengths, terminated, td_coef, discount)
  # NaN everywhere no real step reads: padding, and V(s_n) of terminated rows.
  q_nan = np.where(mask, q_taken, np.nan).astype(np.float32)
  unread = np.arange(T + 1)[None, :] > lengths[:, None] - terminated[:, None]
  values_nan = np.where(unread, np.nan, values).astype(np.float32)
  loss_fn = functools.partial(soft_q.inverse_soft_q_loss, mask=mask, terminated=terminated,
                              td_coef=td_coef, discount=discount)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      q_nan, values_nan)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(grads[0][~mask] == 0.0) and np.all(grads[1][unread] == 0.0)
  assert metrics['num_real_tokens'] == lengths.sum()
  np.testing.assert_allclose(metrics['loss'], loss)


def test_inverse_soft_q_metrics_and_eos_value():
  # One terminated row of 2 tokens, one truncated row of 1 token.
  q_taken = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)
  values = np.array([[1.5, 2.5, 99.0], [4.0, 0.5, 7.0]], np.float32)
  mask = np.array([[1, 1], [1, 0]], bool)
  _, metrics = soft_q.inverse_soft_q_loss(
      q_taken, values, mask, np.array([True, False]), td_coef=1.0, discount=1.0)
  # Implied rewards: 1 - 2.5, 2 - 0 (after EOS), 3 - 0.5 (bootstrap V(s_1)).
  implied = np.array([-1.5, 2.0, 2.5])
  log_pi = np.array([1.0 - 1.5, 2.0 - 2.5, 3.0 - 4.0])
  np.testing.assert_allclose(metrics['implied_reward'], implied.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['td_error'], np.abs(implied).mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['nll'], -log_pi.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], -log_pi.mean() + np.mean(implied ** 2),
                             rtol=1e-6)


def _pcl_loop(logprobs, target_values, rewards, token_rewards, lengths, terminated,
              multi_step, discount, values=None):
  """0.5 * residual^2 per real token from the direct (not telescoped) definitions.

  With `values`, each path starts from the learner's V(s_t) and bootstraps from the target.
  """
  lp, tv, tr = np.float64(logprobs), np.float64(target_values), np.float64(token_rewards)
  start_values = tv if values is None else np.float64(values)
  total, abs_total, count = 0.0, 0.0, 0
  for b, n in enumerate(lengths):
    r = tr[b, :n].copy()
    r[n - 1] += rewards[b]
    bootstrap = 0.0 if terminated[b] else tv[b, n]
    for t in range(n):
      if multi_step:
        weights = discount ** np.arange(n - t)
        residual = (np.sum(weights * lp[b, t:n]) - np.sum(weights * r[t:n])
                    - discount ** (n - t) * bootstrap + start_values[b, t])
      else:
        next_value = bootstrap if t == n - 1 else tv[b, t + 1]
        residual = lp[b, t] + start_values[b, t] - r[t] - discount * next_value
      total += 0.5 * residual ** 2
      abs_total += abs(residual)
      count += 1
  return total / count, abs_total / count


def _pcl_inputs(seed):
  lengths, mask, terminated = _padded_layout(seed)
  rng = np.random.default_rng(seed + 200)
  logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
  target_values = rng.normal(size=(B, T + 1)).astype(np.float32)
  rewards = rng.normal(size=B).astype(np.float32)
  token_rewards = rng.normal(scale=0.3, size=(B, T)).astype(np.float32)
  return lengths, mask, terminated, logprobs, target_values, rewards, token_rewards


@pytest.mark.parametrize('multi_step', [False, True])
@pytest.mark.parametrize('discount', [1.0, 0.8])
@pytest.mark.parametrize('with_token_rewards', [False, True])
def test_path_consistency_matches_loop(multi_step, discount, with_token_rewards):
  lengths, mask, terminated, logprobs, target_values, rewards, token_rewards = (
      _pcl_inputs(seed=4))
  if not with_token_rewards:
    token_rewards = np.zeros_like(token_rewards)
  expected, expected_abs = _pcl_loop(logprobs, target_values, rewards, token_rewards,
                                     lengths, terminated, multi_step, discount)
  unread = np.arange(T + 1)[None, :] > lengths[:, None] - terminated[:, None]
  loss, metrics = soft_q.path_consistency_loss(
      np.where(mask, logprobs, -np.inf).astype(np.float32),
      np.where(unread, np.nan, target_values).astype(np.float32),
      rewards,
      np.where(mask, token_rewards, np.nan).astype(np.float32) if with_token_rewards
      else None,
      mask, terminated, multi_step=multi_step, discount=discount)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['td_error'], expected_abs, rtol=1e-5)
  np.testing.assert_allclose(metrics['mean_logprob'], logprobs[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize('multi_step', [False, True])
def test_path_consistency_with_online_values_starts_paths_from_them(multi_step):
  lengths, mask, terminated, logprobs, target_values, rewards, token_rewards = (
      _pcl_inputs(seed=6))
  values = np.random.default_rng(7).normal(size=target_values.shape).astype(np.float32)
  expected, _ = _pcl_loop(logprobs, target_values, rewards, token_rewards, lengths, terminated,
                          multi_step, 0.9, values=values)

  def loss(values):
    return soft_q.path_consistency_loss(logprobs, target_values, rewards, token_rewards, mask,
                                        terminated, multi_step=multi_step, discount=0.9,
                                        values=values)[0]

  np.testing.assert_allclose(loss(values), expected, rtol=1e-5)
  grads = jax.grad(loss)(values)
  # Only V(s_t) of real start tokens is trained; bootstraps stay the target's.
  np.testing.assert_array_equal(grads[:, :-1][~mask], 0.0)
  np.testing.assert_array_equal(grads[:, -1], 0.0)
  assert np.all(grads[:, :-1][mask] != 0)


@pytest.mark.parametrize('multi_step', [False, True])
def test_path_consistency_gradient_reaches_only_real_logprobs(multi_step):
  lengths, mask, terminated, logprobs, target_values, rewards, token_rewards = (
      _pcl_inputs(seed=5))
  logprobs = np.where(mask, logprobs, np.nan).astype(np.float32)
  grads = jax.grad(
      lambda lp, tv: soft_q.path_consistency_loss(
          lp, tv, rewards, token_rewards, mask, terminated, multi_step=multi_step)[0],
      argnums=(0, 1))(logprobs, target_values)
  np.testing.assert_array_equal(grads[1], 0.0)  # Target values are constants.
  assert np.all(np.isfinite(grads[0]))
  np.testing.assert_array_equal(grads[0][~mask], 0.0)
  if not multi_step:
    # d/d log pi of 0.5 * c_t^2 / count is c_t / count.
    residuals = np.zeros((B, T))
    for b, n in enumerate(lengths):
      for t in range(n):
        next_value = (0.0 if terminated[b] else target_values[b, n]) if t == n - 1 else (
            target_values[b, t + 1])
        reward = token_rewards[b, t] + (rewards[b] if t == n - 1 else 0.0)
        residuals[b, t] = logprobs[b, t] + target_values[b, t] - reward - next_value
    np.testing.assert_allclose(grads[0][mask], residuals[mask] / mask.sum(), rtol=1e-4,
                               atol=1e-6)


def _expected_loss(loss_fn, logits, weights):
  """sum_a sg(w_a) * loss(row a): the exact expectation of the per-row loss."""
  per_action = jax.vmap(loss_fn, in_axes=(None, 0))(logits, jnp.arange(logits.shape[-1]))
  return jnp.sum(jax.lax.stop_gradient(weights) * per_action)


def test_path_consistency_bandit_converges_to_soft_optimal_policy():
  # One state, three answers, one token each; logits are Q and a Polyak copy of them
  # gives V_target. Actions are weighted by the current policy (on-policy, exact).
  rewards = jnp.array([1.0, 0.0, -1.5])
  optimal = np.exp(rewards) / np.exp(rewards).sum()
  optimizer = optax.adam(0.05)

  @jax.jit
  def update(logits, target_logits, opt_state):
    target_value = jax.nn.logsumexp(target_logits)

    def loss_fn(logits):
      def one_answer(logits, action):
        logprob = jax.nn.log_softmax(logits)[action]
        return soft_q.path_consistency_loss(
            logprob.reshape(1, 1), jnp.array([[target_value, jnp.nan]]),
            rewards[action][None], None, jnp.ones((1, 1), bool), jnp.array([True]),
            multi_step=False)[0]
      return _expected_loss(one_answer, logits, jax.nn.softmax(logits))

    grads = jax.grad(loss_fn)(logits)
    updates, opt_state = optimizer.update(grads, opt_state)
    logits = optax.apply_updates(logits, updates)
    return logits, 0.9 * target_logits + 0.1 * logits, opt_state

  logits = jnp.array([0.0, 2.0, 0.5])
  target_logits, opt_state = logits, optimizer.init(logits)
  for _ in range(1500):
    logits, target_logits, opt_state = update(logits, target_logits, opt_state)
  np.testing.assert_allclose(jax.nn.softmax(logits), optimal, atol=0.01)


def test_multi_step_path_consistency_learns_soft_optimal_two_step_policy():
  # A depth-2 tree: first token a in {0, 1}, second token b in {0, 1, 2}, reward
  # r(a, b) at the end. The soft-optimal policy over paths is exp(r) / Z, i.e.
  # pi*(a) proportional to sum_b exp(r(a, b)) and pi*(b|a) to exp(r(a, b)).
  rewards = jnp.array([[0.5, -1.0, 1.0], [2.0, -2.0, -2.0]])
  optimal_paths = np.exp(rewards) / np.exp(rewards).sum()
  optimizer = optax.adam(0.05)

  @jax.jit
  def update(params, target_params, opt_state):
    # params: first-step logits [2] and second-step logits [2, 3].
    first_target, second_target = target_params

    def loss_fn(params):
      first, second = params

      def one_path(params, path):
        first, second = params
        a, b = path // 3, path % 3
        logprobs = jnp.stack([jax.nn.log_softmax(first)[a],
                              jax.nn.log_softmax(second[a])[b]])[None]
        values = jnp.stack([jax.nn.logsumexp(first_target),
                            jax.nn.logsumexp(second_target[a]), jnp.nan])[None]
        return soft_q.path_consistency_loss(
            logprobs, values, rewards[a, b][None], None, jnp.ones((1, 2), bool),
            jnp.array([True]), multi_step=True)[0]

      path_probs = (jax.nn.softmax(first)[:, None] * jax.nn.softmax(second, -1)).ravel()
      per_path = jax.vmap(one_path, in_axes=(None, 0))(params, jnp.arange(6))
      return jnp.sum(jax.lax.stop_gradient(path_probs) * per_path)

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    target_params = jax.tree_util.tree_map(lambda t, p: 0.9 * t + 0.1 * p,
                                           target_params, params)
    return params, target_params, opt_state

  params = (jnp.zeros(2), jnp.zeros((2, 3)))
  target_params, opt_state = params, optimizer.init(params)
  for _ in range(1500):
    params, target_params, opt_state = update(params, target_params, opt_state)
  first, second = params
  paths = jax.nn.softmax(first)[:, None] * jax.nn.softmax(second, -1)
  np.testing.assert_allclose(paths, optimal_paths, atol=0.01)


def _pcl_kwargs(seed):
  _, mask, terminated, logprobs, target_values, rewards, token_rewards = _pcl_inputs(seed)
  return dict(logprobs=logprobs, target_values=target_values, rewards=rewards,
              token_rewards=token_rewards, mask=mask, terminated=terminated, multi_step=False)


@pytest.mark.parametrize('overrides, match', [
    ({'target_values': np.zeros((B, T))}, r'target_values must be \[B, T \+ 1\]'),
    ({'values': np.zeros((B, T))}, r'values must be \[B, T \+ 1\]'),
    ({'logprobs': np.zeros((B, T - 1))}, 'different shapes'),
    ({'rewards': np.zeros((B, 1))}, re.escape(f'rank 2 (shape {(B, 1)})')),
    ({'terminated': np.zeros(B + 1, bool)}, re.escape(f'has shape {(B + 1,)}')),
    ({'token_rewards': np.zeros((B, T, 1))}, re.escape(f'shape {(B, T, 1)}')),
])
def test_path_consistency_rejects_bad_shapes(overrides, match):
  with pytest.raises(AssertionError, match=match):
    soft_q.path_consistency_loss(**{**_pcl_kwargs(seed=6), **overrides})


def test_path_consistency_rejects_a_discount_above_one():
  with pytest.raises(ValueError, match='discount'):
    soft_q.path_consistency_loss(**{**_pcl_kwargs(seed=6), 'discount': 1.5})


def _inverse_soft_q_kwargs(seed):
  _, mask, terminated = _padded_layout(seed)
  return dict(q_taken=np.zeros((B, T)), values=np.zeros((B, T + 1)), mask=mask,
              terminated=terminated, td_coef=0.1)


@pytest.mark.parametrize('overrides, match', [
    ({'values': np.zeros((B, T))}, r'values must be \[B, T \+ 1\]'),
    ({'mask': np.ones(T, bool)}, 'rank 1'),
    ({'terminated': np.zeros(B - 1, bool)}, re.escape(f'has shape {(B - 1,)}')),
])
def test_inverse_soft_q_rejects_bad_shapes(overrides, match):
  with pytest.raises(AssertionError, match=match):
    soft_q.inverse_soft_q_loss(**{**_inverse_soft_q_kwargs(seed=7), **overrides})


def test_inverse_soft_q_rejects_a_negative_td_coef():
  with pytest.raises(ValueError, match='td_coef'):
    soft_q.inverse_soft_q_loss(**{**_inverse_soft_q_kwargs(seed=7), 'td_coef': -1.0})


def test_all_padding_batch_gives_zero_loss_not_nan():
  mask = np.zeros((2, 3), bool)
  loss, _ = soft_q.path_consistency_loss(
      np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2), None, mask, np.ones(2, bool),
      multi_step=True)
  assert loss == 0.0
  loss, _ = soft_q.inverse_soft_q_loss(
      np.zeros((2, 3)), np.zeros((2, 4)), mask, np.ones(2, bool), td_coef=0.1)
  assert loss == 0.0
