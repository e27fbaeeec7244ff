"""BOND and J-BOND: distilling Best-of-N sampling into the policy (arXiv 2407.14622).

`best_of_n_distribution` is the closed form of Best-of-N over a finite answer set,
`jbond_binary_reward` the J-BOND reward of a policy sample against two anchor
samples, and `jbond_loss` the J-BOND objective over token batches: row b is one
completion, step t its t-th token, real tokens form a prefix of the row. Padding
entries may hold anything, NaN included; they reach neither loss nor gradients.
"""
import math

import chex
import jax
import jax.numpy as jnp

_BASELINES = ('mean', 'leave_one_out', 'none')


def best_of_n_distribution(reference_probs: jax.Array, rewards: jax.Array,
                           n: int) -> jax.Array:
  """Distribution of the highest-reward answer among n independent reference draws.

  pi_BoN(y) = pi_ref(y) * sum_{i=1..n} p_le(y)^(n-i) * p_lt(y)^(i-1), with
  p_le(y) = P_{y'~pi_ref}[r(y') <= r(y)] and p_lt(y) the same with <; this is
  ALGORITHMS.md's pi_ref * p_le^(n-1) * sum_i (p_lt / p_le)^(i-1) written without a
  division. With distinct rewards it equals p_le^n - p_lt^n, the probability that
  the best of n draws is y. Ties are broken uniformly at random among the tied
  draws: answers sharing a reward split that reward level's Best-of-N mass in
  proportion to pi_ref, which is what the formula gives.

  Args:
    reference_probs: [K] pi_ref over the K answers, summing to 1.
    rewards: [K] r(y) of each answer.
    n: number of draws, >= 1.

  Returns:
    [K] pi_BoN, summing to 1.
  """
  chex.assert_rank([reference_probs, rewards], 1)
  chex.assert_equal_shape([reference_probs, rewards])
  if int(n) != n or n < 1:
    raise ValueError(f'n must be a positive integer number of draws; got {n}.')
  dtype = jnp.promote_types(jnp.result_type(reference_probs), jnp.float32)
  reference_probs = jnp.asarray(reference_probs, dtype)
  rewards = jnp.asarray(rewards)
  # [K, K]: entry (y, y') says whether r(y') <= r(y), resp. < r(y).
  at_most = rewards[None, :] <= rewards[:, None]
  below = rewards[None, :] < rewards[:, None]
  p_le = jnp.sum(jnp.where(at_most, reference_probs[None, :], 0.0), axis=1)
  p_lt = jnp.sum(jnp.where(below, reference_probs[None, :], 0.0), axis=1)
  total = sum(p_le ** (n - i) * p_lt ** (i - 1) for i in range(1, int(n) + 1))
  return reference_probs * total


def jbond_binary_reward(win_probability: jax.Array) -> jax.Array:
  """J-BOND's reward: -log 16 if y loses to every anchor sample, else 0.

  Args:
    win_probability: [B] p-hat<=(y), the share of the prompt's anchor samples whose reward
      is <= r(y) (0 exactly when r(y) < the smallest anchor reward).

  Returns:
    [B] r_J(y) in {-log 16, 0}.
  """
  chex.assert_rank(win_probability, 1)
  dtype = jnp.promote_types(jnp.result_type(win_probability), jnp.float32)
  return jnp.where(jnp.asarray(win_probability) > 0, jnp.asarray(0.0, dtype),
                   jnp.asarray(-math.log(16.0), dtype))


def _masked_sum(per_token: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] sum over real tokens; `where`, not a product, so NaN padding cannot leak."""
  return jnp.sum(jnp.where(mask, per_token, 0.0), axis=1)


def _baseline(returns: jax.Array, kind: str) -> jax.Array:
  """[B] baseline of each row's return (constants: `returns` is stop-gradiented)."""
  if kind == 'none':
    return jnp.zeros_like(returns)
  if kind == 'mean':
    return jnp.broadcast_to(jnp.mean(returns), returns.shape)
  batch_size = returns.shape[0]
  if batch_size < 2:
    raise ValueError('baseline="leave_one_out" needs a batch of at least 2 rows; use '
                     '"mean" or "none" for a single row.')
  return (jnp.sum(returns) - returns) / (batch_size - 1)


def jbond_loss(
    policy_logprobs: jax.Array,
    anchor_logprobs: jax.Array,
    best_anchor_logprobs: jax.Array,
    mask: jax.Array,
    best_anchor_mask: jax.Array,
    binary_reward: jax.Array,
    *,
    beta: float = 0.5,
    kl_coef: float = 0.0,
    baseline: str = 'mean',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """J-BOND: (1 - beta) * forward + beta * backward + kl_coef * regulariser.

  Per prompt, y ~ pi_theta and y'_best is the better of two anchor samples.
  All three terms are sums over a sequence's real tokens (sequence log-likelihoods,
  the quantities the BOND divergences are defined on), averaged over the batch:
    forward  = mean_b -log pi_theta(y'_best), maximum likelihood on Best-of-2;
    backward = mean_b -log pi_theta(y) * sg(R - baseline), with
               R = binary_reward - sg(log pi_theta(y) - log pi_anchor(y));
    reg      = an estimate of KL(pi_theta || pi_anchor) on y ~ pi_theta.
  `baseline`: 'mean' is the batch mean of R (includes the row itself, a bias of
  order 1/B), 'leave_one_out' the mean of R over the other rows (unbiased),
  'none' 0.

  The regulariser's value is the Monte-Carlo estimate sum_t (log pi_theta -
  log pi_anchor)(y_t). Its gradient is the score-function estimator with rewards to
  go, sum_t grad log pi_theta(y_t|s_t) * sg(sum_{l>=t} log-ratio_l): unbiased for
  the gradient of the sequence KL, with less variance than weighting every token
  by the whole sequence's log-ratio (a token cannot affect the earlier ratios).

  `binary_reward` is any per-sequence reward; J-BOND uses `jbond_binary_reward`.
  With the anchor fixed at pi_ref, N = 2 and binary_reward = log(p_le(y) + p_lt(y))
  (= log pi_BoN(y) / pi_ref(y)) the backward term is BOND's backward policy gradient
  with beta_BOND = 1 / (N - 1) = 1, so both terms have pi_BoN as their fixed point.

  Args:
    policy_logprobs: [B, T] log pi_theta(y_t|s_t) of the policy sample y.
    anchor_logprobs: [B, T] log pi_anchor(y_t|s_t) of the same tokens.
    best_anchor_logprobs: [B, T2] log pi_theta of the better anchor sample's tokens.
    mask: [B, T] bool (or 0/1), True on the real tokens of y.
    best_anchor_mask: [B, T2] bool (or 0/1), True on the real tokens of y'_best.
    binary_reward: [B] r_J(y) (see `jbond_binary_reward`).
    beta: weight of the backward term, in [0, 1] (0.5 in the paper).
    kl_coef: gamma >= 0, weight of the KL regulariser.
    baseline: 'mean', 'leave_one_out' or 'none'.

  Returns:
    (loss, metrics), scalar metrics: `loss`, `forward_nll` (mean sequence NLL of
    y'_best), `backward_loss`, `backward_reward` (mean R), `kl_to_anchor` (mean
    sequence log-ratio), `binary_reward` (mean r_J), `win_rate` (share of y with
    r_J = 0, i.e. not worse than both anchor samples), `policy_length` and
    `best_anchor_length` (mean real tokens).
  """
  chex.assert_rank([policy_logprobs, anchor_logprobs, best_anchor_logprobs, mask,
                    best_anchor_mask, binary_reward], [2, 2, 2, 2, 2, 1])
  chex.assert_equal_shape([policy_logprobs, anchor_logprobs, mask])
  chex.assert_equal_shape([best_anchor_logprobs, best_anchor_mask])
  # Every prompt has one better anchor sample, of its own length T2.
  batch_size = jnp.shape(mask)[0]
  chex.assert_shape(best_anchor_mask, (batch_size, None))
  chex.assert_shape(binary_reward, (batch_size,))
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'beta must be in [0, 1] (0.5 in the paper); got {beta}.')
  if not kl_coef >= 0:
    raise ValueError(f'kl_coef must be >= 0; got {kl_coef}.')
  if baseline not in _BASELINES:
    raise ValueError(f'baseline must be one of {_BASELINES}; got {baseline!r}.')

  dtype = jnp.promote_types(
      jnp.result_type(policy_logprobs, anchor_logprobs, best_anchor_logprobs), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  best_anchor_mask = jnp.asarray(best_anchor_mask).astype(bool)
  policy_logprobs = jnp.where(mask, jnp.asarray(policy_logprobs, dtype), 0.0)
  anchor_logprobs = jnp.where(mask, jnp.asarray(anchor_logprobs, dtype), 0.0)
  best_anchor_logprobs = jnp.where(
      best_anchor_mask, jnp.asarray(best_anchor_logprobs, dtype), 0.0)
  binary_reward = jnp.asarray(binary_reward, dtype)

  forward = -jnp.mean(jnp.sum(best_anchor_logprobs, axis=1))

  sequence_logprobs = jnp.sum(policy_logprobs, axis=1)
  log_ratios = jax.lax.stop_gradient(policy_logprobs - anchor_logprobs)
  sequence_log_ratios = jnp.sum(log_ratios, axis=1)
  returns = binary_reward - sequence_log_ratios
  advantages = returns - _baseline(returns, baseline)
  backward = -jnp.mean(sequence_logprobs * advantages)

  # Zero on padding, so the reversed cumulative sum starts at the last real token.
  ratios_to_go = jnp.flip(jnp.cumsum(jnp.flip(log_ratios, axis=1), axis=1), axis=1)
  # Value: the KL estimate; gradient: the rewards-to-go score function.
  score = policy_logprobs - jax.lax.stop_gradient(policy_logprobs)
  reg = jnp.mean(sequence_log_ratios + jnp.sum(ratios_to_go * score, axis=1))

  loss = (1.0 - beta) * forward + beta * backward + kl_coef * reg
  metrics = {
      'loss': loss,
      'forward_nll': forward,
      'backward_loss': backward,
      'backward_reward': jnp.mean(returns),
      'kl_to_anchor': jnp.mean(sequence_log_ratios),
      'binary_reward': jnp.mean(binary_reward),
      'win_rate': jnp.mean(binary_reward == 0.0),
      'policy_length': jnp.mean(jnp.sum(mask, axis=1)),
      'best_anchor_length': jnp.mean(jnp.sum(best_anchor_mask, axis=1)),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
