"""V-trace targets and the IMPALA actor-critic loss over token batches (arXiv 1802.01561).

Pure functions of batch-major arrays: row b is one completion, step t its t-th token.
`values[:, t]` is V(s_t) and `values[:, T]` the value after the last step, used to
bootstrap. Steps where `mask` is False (padding) are identity steps, so a completion of
length L < T bootstraps from `values[:, L]` exactly as if the batch had length L; its
discount at L - 1 decides whether it does (truncated: gamma) or not (terminated: 0).
"""
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

# The common mistake is leaving out V(s_T), which truncated rows bootstrap from.
_VALUES_SHAPE = ('values must be [B, T + 1]: V(s_0) .. V(s_T), the last one bootstraps '
                 'truncated rows.')


class VTraceOutput(NamedTuple):
  """V-trace targets, all [B, T] and stop-gradiented.

  Attributes:
    vs: value targets v_s; V(s_s) on padding.
    pg_advantages: policy-gradient advantages A_s; 0 on padding.
    rhos: truncated importance weights rho_s = min(rho_clip, pi/mu); 0 on padding.
  """
  vs: jax.Array
  pg_advantages: jax.Array
  rhos: jax.Array


def _check_clips(rho_clip: float, pg_rho_clip: float, c_clip: float, lambda_: float):
  for name, clip in (('rho_clip', rho_clip), ('pg_rho_clip', pg_rho_clip),
                     ('c_clip', c_clip)):
    if not clip > 0:
      raise ValueError(f'{name} must be > 0 (it caps pi/mu); got {clip}.')
  if not 0.0 <= lambda_ <= 1.0:
    raise ValueError(f'lambda_ must be in [0, 1]; got {lambda_}.')


def _clipped_ratio(log_rhos: jax.Array, clip: float) -> jax.Array:
  """min(clip, exp(log_rhos)), clipping in log space so that exp cannot overflow."""
  return jnp.exp(jnp.minimum(log_rhos, math.log(clip)))


def vtrace_targets(
    values: jax.Array,
    rewards: jax.Array,
    discounts: jax.Array,
    log_rhos: jax.Array,
    mask: jax.Array,
    *,
    rho_clip: float = 1.0,
    pg_rho_clip: float = 1.0,
    c_clip: float = 1.0,
    lambda_: float = 1.0,
) -> VTraceOutput:
  """V-trace value targets and policy-gradient advantages.

  With rho_t = min(rho_clip, pi/mu), c_t = lambda_ * min(c_clip, pi/mu) and
  delta_t = rho_t * (r_t + gamma_t * V(s_{t+1}) - V(s_t)):
    v_s = V(s_s) + delta_s + gamma_s * c_s * (v_{s+1} - V(s_{s+1})),  v_T = V(s_T);
    A_s = min(pg_rho_clip, pi/mu) * (r_s + gamma_s * v_{s+1} - V(s_s)).
  For lambda_ < 1 the advantage bootstraps from v_{s+1} as in the IMPALA paper and
  SEED RL; rlax instead uses lambda_ * v_{s+1} + (1 - lambda_) * V(s_{s+1}). The two
  agree at lambda_ = 1.

  On padding (mask False) delta = 0 and c = 0, so v_s = V(s_s) there and nothing
  after a row's last real token reaches its real steps. Padding entries of the
  rewards, discounts and log_rhos are ignored even if non-finite; `values` beyond a
  row's bootstrap V(s_L) only pass through to its padding `vs`.

  Args:
    values: [B, T + 1] V(s_0) .. V(s_T).
    rewards: [B, T] r_t.
    discounts: [B, T] gamma_t, the weight of V(s_{t+1}) in step t's target.
    log_rhos: [B, T] log pi(a_t|s_t) - log mu(a_t|s_t).
    mask: [B, T] bool (or 0/1), True on real steps.
    rho_clip: rho-bar, caps the weights in the value targets.
    pg_rho_clip: caps the weights in the policy-gradient advantages.
    c_clip: c-bar, caps the trace coefficients.
    lambda_: trace decay in [0, 1].

  Returns:
    A VTraceOutput of [B, T] arrays, stop-gradiented, at least float32.
  """
  chex.assert_rank([values, rewards, discounts, log_rhos, mask], 2)
  chex.assert_equal_shape([rewards, discounts, log_rhos, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(values, (batch_size, num_steps + 1), custom_message=_VALUES_SHAPE)
  _check_clips(rho_clip, pg_rho_clip, c_clip, lambda_)
  # Long sums over thousands of tokens lose too much in bfloat16.
  dtype = jnp.promote_types(
      jnp.result_type(values, rewards, discounts, log_rhos), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  values = jnp.asarray(values, dtype)
  v_t, v_tp1 = values[:, :-1], values[:, 1:]
  rewards = jnp.asarray(rewards, dtype)
  log_rhos = jnp.asarray(log_rhos, dtype)
  # What feeds the recursion or an output is masked with `where`, not a product, so
  # that padding entries cannot leak in even when non-finite.
  discounts = jnp.where(mask, jnp.asarray(discounts, dtype), 0.0)
  rhos = jnp.where(mask, _clipped_ratio(log_rhos, rho_clip), 0.0)
  cs = jnp.where(mask, lambda_ * _clipped_ratio(log_rhos, c_clip), 0.0)
  deltas = jnp.where(mask, rhos * (rewards + discounts * v_tp1 - v_t), 0.0)

  def step(vs_minus_v_tp1, inputs):
    delta, discount, c = inputs
    vs_minus_v = delta + discount * c * vs_minus_v_tp1
    return vs_minus_v, vs_minus_v

  # lax.scan walks the leading axis, so scan over time-major views.
  _, vs_minus_v = jax.lax.scan(
      step, jnp.zeros(values.shape[0], dtype),
      (deltas.T, discounts.T, cs.T), reverse=True)
  vs = v_t + vs_minus_v.T
  vs_tp1 = jnp.concatenate([vs[:, 1:], values[:, -1:]], axis=1)
  pg_rhos = _clipped_ratio(log_rhos, pg_rho_clip)
  pg_advantages = jnp.where(mask, pg_rhos * (rewards + discounts * vs_tp1 - v_t), 0.0)
  return jax.tree_util.tree_map(
      jax.lax.stop_gradient, VTraceOutput(vs=vs, pg_advantages=pg_advantages, rhos=rhos))


def vtrace_loss(
    target_logprobs: jax.Array,
    behaviour_logprobs: jax.Array,
    values: jax.Array,
    entropy: jax.Array,
    rewards: jax.Array,
    discounts: jax.Array,
    mask: jax.Array,
    *,
    rho_clip: float = 1.0,
    pg_rho_clip: float = 1.0,
    c_clip: float = 1.0,
    lambda_: float = 1.0,
    value_cost: float = 0.5,
    entropy_cost: float = 0.01,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IMPALA actor-critic loss with V-trace targets, averaged over real tokens.

  Per real token:
    -sg(A_s) * log pi(a_s|s_s) + value_cost * 0.5 * (sg(v_s) - V(s_s))^2
    - entropy_cost * H(pi(.|s_s)),
  summed and divided by max(number of real tokens, 1). Gradients reach
  `target_logprobs`, `values[:, :T]` (through the value loss only) and `entropy`;
  the importance weights and targets are constants.

  Args:
    target_logprobs: [B, T] log pi(a_t|s_t) of the learner policy.
    behaviour_logprobs: [B, T] log mu(a_t|s_t) of the policy that sampled a_t.
    values: [B, T + 1] V(s_0) .. V(s_T) of the learner's value head.
    entropy: [B, T] H(pi(.|s_t)).
    rewards: [B, T] r_t.
    discounts: [B, T] gamma_t.
    mask: [B, T] bool (or 0/1), True on real tokens.
    rho_clip: see `vtrace_targets`.
    pg_rho_clip: see `vtrace_targets`.
    c_clip: see `vtrace_targets`.
    lambda_: see `vtrace_targets` (advantages bootstrap from v_{s+1}).
    value_cost: weight of the value loss.
    entropy_cost: weight of the entropy bonus.

  Returns:
    (loss, metrics): the scalar loss and scalar metrics, each a mean over real
    tokens: `loss`, `pg_loss`, `value_loss` (unweighted 0.5 * squared error),
    `entropy`, `mean_rho` (of the truncated rho_s), `clipped_rho_fraction` (share of
    tokens with pi/mu > rho_clip), `mean_advantage`, `mean_vs`, `mean_abs_log_rho`
    (policy lag: 0 when pi = mu on the sampled tokens) and `num_real_tokens`.
  """
  chex.assert_rank(
      [target_logprobs, behaviour_logprobs, values, entropy, rewards, discounts, mask], 2)
  chex.assert_equal_shape(
      [target_logprobs, behaviour_logprobs, entropy, rewards, discounts, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(values, (batch_size, num_steps + 1), custom_message=_VALUES_SHAPE)
  mask = jnp.asarray(mask).astype(bool)
  log_rhos = target_logprobs - behaviour_logprobs
  # vtrace_targets stop-gradients its outputs, so the weights and targets are constants.
  targets = vtrace_targets(
      values, rewards, discounts, log_rhos, mask,
      rho_clip=rho_clip, pg_rho_clip=pg_rho_clip, c_clip=c_clip, lambda_=lambda_)

  num_real_tokens = jnp.sum(mask)
  denominator = jnp.maximum(num_real_tokens, 1)

  def masked_mean(per_token):
    # `where`, not a product: padding may hold non-finite values, and their
    # gradients must be exactly 0.
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / denominator

  pg_loss = masked_mean(-targets.pg_advantages * target_logprobs)
  # Masked before squaring too: the square's gradient at a non-finite padding value
  # would be NaN even with a zero cotangent.
  value_errors = jnp.where(mask, targets.vs - values[:, :-1], 0.0)
  value_loss = masked_mean(0.5 * jnp.square(value_errors))
  mean_entropy = masked_mean(entropy)
  loss = pg_loss + value_cost * value_loss - entropy_cost * mean_entropy
  metrics = {
      'loss': loss,
      'pg_loss': pg_loss,
      'value_loss': value_loss,
      'entropy': mean_entropy,
      'mean_rho': masked_mean(targets.rhos),
      'clipped_rho_fraction': masked_mean(log_rhos > math.log(rho_clip)),
      'mean_advantage': masked_mean(targets.pg_advantages),
      'mean_vs': masked_mean(targets.vs),
      'mean_abs_log_rho': masked_mean(jnp.abs(log_rhos)),
      'num_real_tokens': num_real_tokens,
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
