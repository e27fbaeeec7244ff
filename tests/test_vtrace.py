"""Tests for V-trace targets and loss, against rlax and a direct loop of the paper."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from chorus.learners import vtrace

B, T = 6, 9


def _random_inputs(seed, batch_size=B, num_steps=T):
  rng = np.random.default_rng(seed)
  return dict(
      values=rng.normal(size=(batch_size, num_steps + 1)).astype(np.float32),
      rewards=rng.normal(size=(batch_size, num_steps)).astype(np.float32),
      discounts=rng.uniform(0.5, 1.0, size=(batch_size, num_steps)).astype(np.float32),
      # Spread wide enough that every clip threshold below binds on some steps.
      log_rhos=rng.normal(scale=1.0, size=(batch_size, num_steps)).astype(np.float32),
  )


def _rlax_row(values, rewards, discounts, log_rhos, rho_clip, pg_rho_clip):
  """rlax on one unpadded row: returns (vs, pg_advantages)."""
  out = rlax.vtrace_td_error_and_advantage(
      v_tm1=jnp.asarray(values[:-1]), v_t=jnp.asarray(values[1:]),
      r_t=jnp.asarray(rewards), discount_t=jnp.asarray(discounts),
      rho_tm1=jnp.exp(jnp.asarray(log_rhos)), lambda_=1.0,
      clip_rho_threshold=rho_clip, clip_pg_rho_threshold=pg_rho_clip)
  return out.errors + values[:-1], out.pg_advantage


def _paper_row(values, rewards, discounts, log_rhos, rho_clip, pg_rho_clip, c_clip,
               lambda_):
  """The IMPALA recursion, written as a float64 loop; advantages bootstrap from v_{s+1}."""
  values, rewards, discounts = (np.asarray(x, np.float64) for x in (values, rewards,
                                                                    discounts))
  ratios = np.exp(np.asarray(log_rhos, np.float64))
  num_steps = len(rewards)
  vs = np.zeros(num_steps + 1)
  vs[num_steps] = values[num_steps]
  advantages = np.zeros(num_steps)
  for s in reversed(range(num_steps)):
    rho = min(rho_clip, ratios[s])
    c = lambda_ * min(c_clip, ratios[s])
    delta = rho * (rewards[s] + discounts[s] * values[s + 1] - values[s])
    vs[s] = values[s] + delta + discounts[s] * c * (vs[s + 1] - values[s + 1])
  for s in range(num_steps):
    advantages[s] = min(pg_rho_clip, ratios[s]) * (
        rewards[s] + discounts[s] * vs[s + 1] - values[s])
  return vs[:-1], advantages


def _padded_batch(seed):
  """Completions of random lengths, some terminated; NaN in padding."""
  inputs = _random_inputs(seed)
  rng = np.random.default_rng(seed + 1000)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0], lengths[1] = 1, T
  terminated = rng.uniform(size=B) < 0.5
  terminated[0], terminated[1] = True, False
  mask = np.arange(T)[None, :] < lengths[:, None]
  discounts = np.where(mask, inputs['discounts'], 0.0).astype(np.float32)
  discounts[np.arange(B), lengths - 1] = np.where(
      terminated, 0.0, inputs['discounts'][np.arange(B), lengths - 1])
  inputs['discounts'] = np.where(mask, discounts, np.nan).astype(np.float32)
  inputs['rewards'] = np.where(mask, inputs['rewards'], np.nan).astype(np.float32)
  inputs['log_rhos'] = np.where(mask, inputs['log_rhos'], np.nan).astype(np.float32)
  # values[:, L] bootstraps row b; values beyond it belong to no state of the row.
  beyond_bootstrap = np.arange(T + 1)[None, :] > lengths[:, None]
  inputs['values'] = np.where(beyond_bootstrap, np.nan, inputs['values']).astype(np.float32)
  return inputs, mask, lengths


@pytest.mark.parametrize('rho_clip, pg_rho_clip', [
    (1.0, 1.0), (0.5, 2.0), (2.0, 0.5), (1e6, 1e6)])
def test_full_rows_match_rlax_at_lambda_one(rho_clip, pg_rho_clip):
  inputs = _random_inputs(seed=0)
  out = vtrace.vtrace_targets(
      **inputs, mask=np.ones((B, T), bool), rho_clip=rho_clip, pg_rho_clip=pg_rho_clip)
  vs, advantages = jax.vmap(
      functools.partial(_rlax_row, rho_clip=rho_clip, pg_rho_clip=pg_rho_clip))(**inputs)
  np.testing.assert_allclose(out.vs, vs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.pg_advantages, advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      out.rhos, np.minimum(rho_clip, np.exp(inputs['log_rhos'])), rtol=1e-6)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_padded_rows_match_rlax_on_their_valid_prefix(seed):
  inputs, mask, lengths = _padded_batch(seed)
  out = vtrace.vtrace_targets(**inputs, mask=mask, rho_clip=1.5, pg_rho_clip=1.2)
  for b, length in enumerate(lengths):
    # values[b, length] is the bootstrap V(s_L); the discount at L - 1 gates it.
    vs, advantages = _rlax_row(
        values=inputs['values'][b, :length + 1], rewards=inputs['rewards'][b, :length],
        discounts=inputs['discounts'][b, :length], log_rhos=inputs['log_rhos'][b, :length],
        rho_clip=1.5, pg_rho_clip=1.2)
    np.testing.assert_allclose(out.vs[b, :length], vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pg_advantages[b, :length], advantages, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(out.vs[b, length:], inputs['values'][b, length:T])
    np.testing.assert_array_equal(out.pg_advantages[b, length:], 0.0)
    np.testing.assert_array_equal(out.rhos[b, length:], 0.0)


@pytest.mark.parametrize('lambda_, c_clip, rho_clip, pg_rho_clip', [
    (0.0, 1.0, 1.0, 1.0), (0.5, 1.0, 1.0, 1.0), (0.9, 0.7, 2.0, 0.8), (0.95, 3.0, 1.0, 1.0),
    (1.0, 0.5, 1.0, 1.0)])
def test_matches_paper_recursion_for_any_lambda_and_c_clip(lambda_, c_clip, rho_clip,
                                                           pg_rho_clip):
  inputs, mask, lengths = _padded_batch(seed=4)
  clips = dict(rho_clip=rho_clip, pg_rho_clip=pg_rho_clip, c_clip=c_clip, lambda_=lambda_)
  out = vtrace.vtrace_targets(**inputs, mask=mask, **clips)
  for b, length in enumerate(lengths):
    vs, advantages = _paper_row(
        inputs['values'][b, :length + 1], inputs['rewards'][b, :length],
        inputs['discounts'][b, :length], inputs['log_rhos'][b, :length], **clips)
    np.testing.assert_allclose(out.vs[b, :length], vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pg_advantages[b, :length], advantages, rtol=1e-5,
                               atol=1e-5)


def test_lambda_below_one_bootstraps_advantage_from_vs_not_rlax_mixture():
  inputs = _random_inputs(seed=5)
  out = vtrace.vtrace_targets(**inputs, mask=np.ones((B, T), bool), lambda_=0.5)
  rlax_advantages = jax.vmap(
      lambda v, r, d, lr: rlax.vtrace_td_error_and_advantage(
          v[:-1], v[1:], r, d, jnp.exp(lr), lambda_=0.5).pg_advantage)(
              inputs['values'], inputs['rewards'], inputs['discounts'], inputs['log_rhos'])
  # The last step bootstraps from V(s_T) under both conventions; earlier steps differ.
  np.testing.assert_allclose(out.pg_advantages[:, -1], rlax_advantages[:, -1], rtol=1e-5)
  assert np.abs(out.pg_advantages[:, :-1] - rlax_advantages[:, :-1]).max() > 1e-2


def test_on_policy_vs_are_discounted_n_step_returns():
  # Row 0 truncated after 3 tokens, bootstrapping from V(s_3) = 10; row 1 terminated
  # after 2 tokens (its V(s_2) = 100 must not count); row 2 the full length.
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  rewards = np.array([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
  discounts = np.array([[0.9, 0.9, 0.9, 0.0], [0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]])
  values = np.array([[7.0, -3.0, 4.0, 10.0, 55.0],
                     [2.0, 8.0, 100.0, 6.0, 6.0],
                     [0.0, 1.0, 2.0, 3.0, 4.0]])
  out = vtrace.vtrace_targets(values, rewards, discounts, np.zeros((3, 4)), mask)
  np.testing.assert_allclose(out.vs, [
      # v_2 = 3 + .9 * 10, v_1 = 2 + .9 * 12, v_0 = 1 + .9 * 12.8; padding keeps V.
      [12.52, 12.8, 12.0, 10.0],
      # v_1 = 1, v_0 = 1 + .5 * 1.
      [1.5, 1.0, 100.0, 6.0],
      # v_3 = 1 + .5 * 4, the rest undiscounted.
      [3.0, 3.0, 3.0, 3.0],
  ], rtol=1e-6)


def test_targets_are_stop_gradiented_and_jittable():
  inputs = _random_inputs(seed=6)
  mask = np.ones((B, T), bool)

  def total(values):
    out = vtrace.vtrace_targets(values, inputs['rewards'], inputs['discounts'],
                                inputs['log_rhos'], mask, lambda_=0.9)
    return jnp.sum(out.vs) + jnp.sum(out.pg_advantages)

  np.testing.assert_array_equal(jax.grad(total)(inputs['values']), 0.0)
  jitted = jax.jit(functools.partial(vtrace.vtrace_targets, lambda_=0.9))
  np.testing.assert_allclose(
      jitted(**inputs, mask=mask).vs,
      vtrace.vtrace_targets(**inputs, mask=mask, lambda_=0.9).vs, rtol=1e-5, atol=1e-6)


def _loss_inputs(seed):
  inputs, mask, _ = _padded_batch(seed)
  rng = np.random.default_rng(seed + 2000)
  behaviour = rng.normal(size=(B, T)).astype(np.float32) - 2.0
  return dict(
      target_logprobs=np.where(mask, behaviour + inputs['log_rhos'], -np.inf).astype(
          np.float32),
      behaviour_logprobs=behaviour,
      values=inputs['values'],
      entropy=np.where(mask, rng.uniform(0.0, 3.0, size=(B, T)), np.nan).astype(np.float32),
      rewards=inputs['rewards'],
      discounts=inputs['discounts'],
      mask=mask,
  )


def test_policy_gradient_is_minus_advantage_over_real_token_count():
  inputs = _loss_inputs(seed=7)
  mask = inputs['mask']
  kwargs = dict(rho_clip=1.5, pg_rho_clip=0.8, lambda_=0.9)
  grad = jax.grad(lambda lp: vtrace.vtrace_loss(**{**inputs, 'target_logprobs': lp},
                                                **kwargs)[0])(inputs['target_logprobs'])
  targets = vtrace.vtrace_targets(
      inputs['values'], inputs['rewards'], inputs['discounts'],
      inputs['target_logprobs'] - inputs['behaviour_logprobs'], mask, **kwargs)
  expected = np.where(mask, -targets.pg_advantages / mask.sum(), 0.0)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  assert np.all(grad[~mask] == 0.0)


def test_value_and_entropy_gradients_skip_bootstrap_and_padding():
  inputs = _loss_inputs(seed=8)
  mask = inputs['mask']
  value_grad, entropy_grad = jax.grad(
      lambda v, h: vtrace.vtrace_loss(**{**inputs, 'values': v, 'entropy': h},
                                      value_cost=0.5, entropy_cost=0.01)[0],
      argnums=(0, 1))(inputs['values'], inputs['entropy'])
  targets = vtrace.vtrace_targets(
      inputs['values'], inputs['rewards'], inputs['discounts'],
      inputs['target_logprobs'] - inputs['behaviour_logprobs'], mask)
  num_real = mask.sum()
  np.testing.assert_allclose(
      value_grad[:, :T],
      np.where(mask, -0.5 * (targets.vs - inputs['values'][:, :T]) / num_real, 0.0),
      rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(value_grad[:, T], 0.0)
  np.testing.assert_allclose(entropy_grad, np.where(mask, -0.01 / num_real, 0.0),
                             rtol=1e-6)


def test_value_loss_is_zero_when_values_satisfy_bellman_equation():
  inputs = _loss_inputs(seed=9)
  mask, rewards, discounts = inputs['mask'], inputs['rewards'], inputs['discounts']
  # V(s_t) = r_t + gamma_t V(s_{t+1}) on real steps makes every TD error 0, whatever
  # the importance weights, so the targets are the values themselves.
  values = inputs['values'].astype(np.float64)
  for t in reversed(range(T)):
    values[:, t] = np.where(mask[:, t],
                            rewards[:, t] + discounts[:, t] * values[:, t + 1],
                            values[:, t])
  loss, metrics = vtrace.vtrace_loss(
      **{**inputs, 'values': values.astype(np.float32)}, entropy_cost=0.0)
  assert abs(metrics['value_loss']) < 1e-10
  assert abs(metrics['pg_loss']) < 1e-5
  assert abs(loss) < 1e-5


def test_loss_metrics_are_finite_scalars_with_expected_values():
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  log_rhos = np.array([[0.5, -0.5, 7.0], [2.0, 0.0, 0.0]], np.float32)
  behaviour = np.full((2, 3), -1.0, np.float32)
  loss, metrics = vtrace.vtrace_loss(
      target_logprobs=behaviour + log_rhos, behaviour_logprobs=behaviour,
      values=np.zeros((2, 4), np.float32), entropy=np.ones((2, 3), np.float32),
      rewards=np.ones((2, 3), np.float32), discounts=np.zeros((2, 3), np.float32),
      mask=mask, rho_clip=2.0)
  assert set(metrics) == {
      'loss', 'pg_loss', 'value_loss', 'entropy', 'mean_rho', 'clipped_rho_fraction',
      'mean_advantage', 'mean_vs', 'mean_abs_log_rho', 'num_real_tokens'}
  for name, value in metrics.items():
    assert jnp.shape(value) == (), name
    assert np.isfinite(value), name
  assert metrics['loss'] == loss
  assert metrics['num_real_tokens'] == 3
  np.testing.assert_allclose(metrics['clipped_rho_fraction'], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['mean_abs_log_rho'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics['mean_rho'], (np.exp(0.5) + np.exp(-0.5) + 2) / 3,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['entropy'], 1.0, rtol=1e-6)


def test_all_padding_batch_gives_zero_loss_not_nan():
  loss, metrics = vtrace.vtrace_loss(
      *(np.zeros((2, 3), np.float32),) * 2, np.zeros((2, 4), np.float32),
      *(np.zeros((2, 3), np.float32),) * 3, np.zeros((2, 3), bool))
  assert loss == 0.0
  assert metrics['num_real_tokens'] == 0


@pytest.mark.parametrize('overrides, match', [
    ({'values': np.zeros((B, T))}, r'values must be \[B, T \+ 1\]'),
    ({'rewards': np.zeros((B, T - 1))}, 'different shapes'),
    ({'mask': np.ones(T, bool)}, 'rank 1'),
])
def test_vtrace_targets_rejects_bad_shapes(overrides, match):
  inputs = {**_random_inputs(seed=10), 'mask': np.ones((B, T), bool), **overrides}
  with pytest.raises(AssertionError, match=match):
    vtrace.vtrace_targets(**inputs)


@pytest.mark.parametrize('overrides, match', [
    ({'rho_clip': 0.0}, 'rho_clip'),
    ({'lambda_': 1.5}, 'lambda_'),
])
def test_vtrace_targets_rejects_bad_hyperparameters(overrides, match):
  inputs = {**_random_inputs(seed=10), 'mask': np.ones((B, T), bool), **overrides}
  with pytest.raises(ValueError, match=match):
    vtrace.vtrace_targets(**inputs)


def test_vtrace_loss_rejects_mismatched_entropy():
  inputs = _loss_inputs(seed=11)
  with pytest.raises(AssertionError, match=re.escape(f'shape {(B, T, 3)}')):
    vtrace.vtrace_loss(**{**inputs, 'entropy': np.zeros((B, T, 3))})
