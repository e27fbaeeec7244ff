"""PPO (arXiv 1707.06347) with generalised advantage estimation (GAE, arXiv 1506.02438).

Pure functions of batch-major token arrays: row b is one completion, step t its t-th
token, real tokens form a prefix of the row (`mask`). `values[:, t]` is V(s_t) and
`values[:, T]` the value after a full-length row, which truncated rows bootstrap from;
a row of length L < T bootstraps from `values[:, L]` when its discount at L - 1 says so
(chorus.learners.token_mdp.token_discounts: gamma if truncated, 0 if terminated).
Padding entries may hold anything, NaN included; they reach neither loss nor gradients.

The "old" policy of PPO's ratio is the behaviour policy mu that sampled the tokens (its
log-probs travel with every trajectory), so the ratio corrects for policy lag too.
"""
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

_VALUES_SHAPE = ('values must be [B, T + 1]: V(s_0) .. V(s_T), the last one bootstraps '
                 'truncated rows.')


class GAEOutput(NamedTuple):
  """Advantages and value targets, [B, T] each, stop-gradiented, 0 on padding.

  Attributes:
    advantages: A_t = sum_l (prod_{k<l} gamma_{t+k} lambda) delta_{t+l}.
    returns: A_t + V(s_t), the value targets.
  """
  advantages: jax.Array
  returns: jax.Array


def gae(values: jax.Array, rewards: jax.Array, discounts: jax.Array, mask: jax.Array, *,
        lambda_: float) -> GAEOutput:
  """Generalised advantage estimates, run backwards from the end of each row.

  delta_t = r_t + gamma_t * V(s_{t+1}) - V(s_t) and A_t = delta_t + gamma_t * lambda_ *
  A_{t+1}, with A = 0 after the last real token; at lambda_ = 1 the returns are the
  discounted returns bootstrapped from the row's last value, at 0 the one-step targets.

  Args:
    values: [B, T + 1] V(s_0) .. V(s_T).
    rewards: [B, T] r_t.
    discounts: [B, T] gamma_t, the weight of V(s_{t+1}) in step t (0 after EOS).
    mask: [B, T] bool (or 0/1), True on real steps.
    lambda_: in [0, 1], the GAE trace decay.

  Returns:
    A GAEOutput, at least float32.
  """
  chex.assert_rank([values, rewards, discounts, mask], 2)
  chex.assert_equal_shape([rewards, discounts, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(values, (batch_size, num_steps + 1), custom_message=_VALUES_SHAPE)
  if not 0.0 <= lambda_ <= 1.0:
    raise ValueError(f'lambda_ must be in [0, 1]; got {lambda_}.')
  dtype = jnp.promote_types(jnp.result_type(values, rewards, discounts), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  values = jnp.asarray(values, dtype)
  # `where`, not a product: non-finite padding must not leak into real steps.
  discounts = jnp.where(mask, jnp.asarray(discounts, dtype), 0.0)
  deltas = jnp.where(mask, jnp.asarray(rewards, dtype) + discounts * values[:, 1:]
                     - values[:, :-1], 0.0)

  def step(next_advantage, inputs):
    delta, discount = inputs
    advantage = delta + discount * lambda_ * next_advantage
    return advantage, advantage

  # lax.scan walks the leading axis, so scan over time-major views.
  _, advantages = jax.lax.scan(step, jnp.zeros(batch_size, dtype), (deltas.T, discounts.T),
                               reverse=True)
  advantages = advantages.T
  returns = jnp.where(mask, advantages + values[:, :-1], 0.0)
  return jax.tree_util.tree_map(jax.lax.stop_gradient, GAEOutput(advantages, returns))


def clipped_surrogate(log_ratios: jax.Array, advantages: jax.Array, *,
                      clip_epsilon: float) -> jax.Array:
  """PPO's per-token objective min(r * A, clip(r, 1 - eps, 1 + eps) * A), to maximise.

  r = exp(log_ratios). Outside the clip range on the side A pushes towards (r > 1 + eps
  with A > 0, r < 1 - eps with A < 0) the clipped term is the minimum and constant, so
  the gradient is 0 there; on the other side the unclipped term keeps pulling back.

  Args:
    log_ratios: [...] log pi(a_t|s_t) - log mu(a_t|s_t).
    advantages: [...] A_t, same shape (constants: stop-gradient them first).
    clip_epsilon: eps > 0.

  Returns:
    [...] the objective per token.
  """
  chex.assert_equal_shape([log_ratios, advantages])
  if not clip_epsilon > 0:
    raise ValueError(f'clip_epsilon must be > 0; got {clip_epsilon}.')
  # Ratios beyond the clip range contribute through the unclipped term only where it is
  # the smaller one, so capping the log-ratio far outside it changes nothing but keeps
  # exp finite on a badly lagged token.
  log_ratios = jnp.minimum(log_ratios, math.log(1.0 + clip_epsilon) + 20.0)
  ratios = jnp.exp(log_ratios)
  clipped = jnp.clip(ratios, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
  return jnp.minimum(ratios * advantages, clipped * advantages)


def outside_clip_range(log_ratios: jax.Array, clip_epsilon: float) -> jax.Array:
  """[...] bool: the ratio exp(log_ratios) is outside [1 - eps, 1 + eps]."""
  ratios = jnp.exp(log_ratios)
  return (ratios > 1.0 + clip_epsilon) | (ratios < 1.0 - clip_epsilon)


def ppo_loss(
    logprobs: jax.Array,
    behaviour_logprobs: jax.Array,
    values: jax.Array,
    entropy: jax.Array,
    advantages: jax.Array,
    returns: jax.Array,
    old_values: jax.Array,
    mask: jax.Array,
    *,
    clip_epsilon: float = 0.2,
    value_cost: float = 0.5,
    value_clip: float = 0.0,
    entropy_cost: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate plus a value loss, averaged over the batch's real tokens.

  Per real token:
    -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + value_cost * value_loss_t
    - entropy_cost * H(pi(.|s_t)),
  r_t = pi(a_t|s_t) / mu(a_t|s_t), value_loss_t = 0.5 * (V(s_t) - R_t)^2, or with
  `value_clip` c > 0 the clipped form 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c)
  - R)^2). Summed and divided by max(number of real tokens, 1).

  Args:
    logprobs: [B, T] log pi(a_t|s_t) of the learner policy.
    behaviour_logprobs: [B, T] log mu(a_t|s_t), the policy that sampled (PPO's pi_old).
    values: [B, T + 1] V(s_t) of the learner's value head (the last column is unused).
    entropy: [B, T] H(pi(.|s_t)).
    advantages: [B, T] A_t (from `gae`), constants.
    returns: [B, T] R_t, the value targets, constants.
    old_values: [B, T] V_old(s_t) the targets were computed with (for `value_clip`).
    mask: [B, T] bool (or 0/1), True on real tokens.
    clip_epsilon: eps of the ratio clip.
    value_cost: weight of the value loss, >= 0.
    value_clip: c of the value clip; 0 turns it off.
    entropy_cost: weight of the entropy bonus, >= 0.

  Returns:
    (loss, metrics), means over real tokens: `loss`, `pg_loss`, `value_loss`, `entropy`,
    `clip_fraction` (share of tokens whose ratio is outside the clip range),
    `mean_abs_log_ratio`, `mean_advantage`, `mean_return`, `num_real_tokens`.
  """
  chex.assert_rank([logprobs, behaviour_logprobs, values, entropy, advantages, returns,
                    old_values, mask], 2)
  chex.assert_equal_shape([logprobs, behaviour_logprobs, entropy, advantages, returns,
                           old_values, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(values, (batch_size, num_steps + 1), custom_message=_VALUES_SHAPE)
  for name, cost in (('value_cost', value_cost), ('value_clip', value_clip),
                     ('entropy_cost', entropy_cost)):
    if not cost >= 0:
      raise ValueError(f'{name} must be >= 0; got {cost}.')
  mask = jnp.asarray(mask).astype(bool)
  denominator = jnp.maximum(jnp.sum(mask), 1)

  def masked_mean(per_token):
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / denominator

  # Masked before any arithmetic: a non-finite padding value would make NaN gradients.
  log_ratios = jnp.where(mask, logprobs - behaviour_logprobs, 0.0)
  advantages = jnp.where(mask, jax.lax.stop_gradient(advantages), 0.0)
  returns = jax.lax.stop_gradient(jnp.where(mask, returns, 0.0))
  old_values = jax.lax.stop_gradient(jnp.where(mask, old_values, 0.0))
  state_values = jnp.where(mask, values[:, :-1], 0.0)
  pg_loss = masked_mean(-clipped_surrogate(log_ratios, advantages, clip_epsilon=clip_epsilon))
  value_errors = jnp.square(state_values - returns)
  if value_clip > 0:
    clipped_values = old_values + jnp.clip(state_values - old_values, -value_clip, value_clip)
    value_errors = jnp.maximum(value_errors, jnp.square(clipped_values - returns))
  value_loss = masked_mean(0.5 * value_errors)
  mean_entropy = masked_mean(entropy)
  loss = pg_loss + value_cost * value_loss - entropy_cost * mean_entropy
  metrics = {
      'loss': loss,
      'pg_loss': pg_loss,
      'value_loss': value_loss,
      'entropy': mean_entropy,
      'clip_fraction': masked_mean(outside_clip_range(log_ratios, clip_epsilon)),
      'mean_abs_log_ratio': masked_mean(jnp.abs(log_ratios)),
      'mean_advantage': masked_mean(advantages),
      'mean_return': masked_mean(returns),
      'num_real_tokens': jnp.sum(mask),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
