"""Soft Q-learning losses for token policies whose logits are soft Q-values.

The logits of a decoder at prefix s_t are read as Q(s_t, .), so
V(s_t) = logsumexp Q(s_t, .) and log pi(a|s_t) = Q(s_t, a) - V(s_t). The implied
reward of a token is r_t = Q(s_t, a_t) - gamma * V(s_{t+1}), with V = 0 after EOS.

Conventions shared with `vtrace` and `token_mdp`: row b is one completion, step t its
t-th token, real tokens form a prefix of the row (`mask`), `values[:, t]` is V(s_t)
and `values[:, T]` the value after the last step. A row of length n bootstraps from
`values[:, n]` if it was truncated and from 0 if it terminated (EOS sampled). Padding
entries of every input may hold anything, NaN included; they reach neither the loss
nor its gradients.
"""
import chex
import jax
import jax.numpy as jnp

from chorus.learners import token_mdp

# The common mistake is leaving out V(s_T), which truncated rows bootstrap from.
_VALUES_SHAPE = 'must be [B, T + 1]: V(s_0) .. V(s_T), the last one bootstraps truncated rows.'


def _check_discount(discount: float):
  if not 0.0 <= discount <= 1.0:
    raise ValueError(f'discount must be in [0, 1] (1 for text); got {discount}.')


def _next_values(values: jax.Array, mask: jax.Array, terminated: jax.Array) -> jax.Array:
  """[B, T] V(s_{t+1}) of each real step; 0 after EOS and on padding.

  A truncated row of length n keeps `values[:, n]` at its last step, so it
  bootstraps; entries beyond that are never read, even if non-finite.
  """
  is_last = (jnp.arange(mask.shape[1])[None, :]
             == token_mdp.last_token_index(mask)[:, None])
  ends_episode = is_last & terminated[:, None]
  return jnp.where(mask & ~ends_episode, values[:, 1:], 0.0)


def soft_values(logits: jax.Array) -> jax.Array:
  """Soft state values V(s) = logsumexp_a Q(s, a) of logits read as soft Q-values.

  Args:
    logits: [B, T + 1, V] Q(s_t, .) for t = 0 .. T.

  Returns:
    [B, T + 1] V(s_t), in the logits' dtype promoted to at least float32.
  """
  chex.assert_rank(logits, 3)
  dtype = jnp.promote_types(jnp.result_type(logits), jnp.float32)
  return jax.nn.logsumexp(jnp.asarray(logits, dtype), axis=-1)


def inverse_soft_q_loss(
    q_taken: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    terminated: jax.Array,
    *,
    td_coef: float,
    discount: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Inverse soft-Q imitation loss: TD-regularised maximum likelihood (arXiv 2409.01369).

  Per real token of a demonstration:
    -log pi(a_t|s_t) + td_coef * (Q(s_t, a_t) - discount * V(s_{t+1}))^2,
  with log pi(a_t|s_t) = Q(s_t, a_t) - V(s_t); the bracket is the implied reward
  r_t. V after EOS (the last real token of a terminated row) is 0; a truncated row
  of length n uses V(s_n) = values[:, n]. The loss is summed over real tokens and
  divided by max(number of real tokens, 1), the normalisation of
  `supervised.token_nll`, so td_coef = 0 is exactly that MLE loss. Gradients flow
  through Q(s_t, a_t), V(s_t) and V(s_{t+1}): the TD term is a regulariser of the
  online network, not a regression onto a fixed target.

  Args:
    q_taken: [B, T] Q(s_t, a_t), the logit of the demonstrated token.
    values: [B, T + 1] V(s_t) = logsumexp of the logits at s_t (see `soft_values`).
    mask: [B, T] bool (or 0/1), True on real tokens.
    terminated: [B] bool, True if the row ends with EOS, False if truncated.
    td_coef: lambda >= 0, weight of the squared implied reward (about 0.1).
    discount: gamma in [0, 1].

  Returns:
    (loss, metrics), metrics holding scalar means over real tokens: `loss`, `nll`
    (-log pi), `td_error` (|implied reward|), `implied_reward`, and
    `num_real_tokens`.
  """
  chex.assert_rank([q_taken, values, mask, terminated], [2, 2, 2, 1])
  chex.assert_equal_shape([q_taken, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(values, (batch_size, num_steps + 1),
                    custom_message=f'values {_VALUES_SHAPE}')
  chex.assert_shape(terminated, (batch_size,))
  _check_discount(discount)
  if not td_coef >= 0:
    raise ValueError(f'td_coef must be >= 0 (0 is plain maximum likelihood); got {td_coef}.')
  dtype = jnp.promote_types(jnp.result_type(q_taken, values), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  terminated = jnp.asarray(terminated).astype(bool)
  q_taken = jnp.asarray(q_taken, dtype)
  values = jnp.asarray(values, dtype)

  # `where` before any nonlinearity, so non-finite padding gets exactly 0 gradient.
  logprobs = jnp.where(mask, q_taken - values[:, :-1], 0.0)
  implied_rewards = jnp.where(
      mask, q_taken - discount * _next_values(values, mask, terminated), 0.0)
  num_real_tokens = jnp.sum(mask)
  denominator = jnp.maximum(num_real_tokens, 1)
  nll = -jnp.sum(logprobs) / denominator
  td_loss = jnp.sum(jnp.square(implied_rewards)) / denominator
  loss = nll + td_coef * td_loss
  metrics = {
      'loss': loss,
      'nll': nll,
      'td_error': jnp.sum(jnp.abs(implied_rewards)) / denominator,
      'implied_reward': jnp.sum(implied_rewards) / denominator,
      'num_real_tokens': num_real_tokens,
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def path_consistency_loss(
    logprobs: jax.Array,
    target_values: jax.Array,
    rewards: jax.Array,
    token_rewards: jax.Array | None,
    mask: jax.Array,
    terminated: jax.Array,
    *,
    multi_step: bool,
    discount: float = 1.0,
    values: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reward-driven soft Q-learning by path consistency (arXiv 2106.07704).

  With r_t = token_rewards[:, t], plus `rewards` on each row's last real token,
  and V = V_target (stop-gradiented; V after EOS is 0, a truncated row of length
  n bootstraps from target_values[:, n]), the residual of real step t is
    single step:  c_t = log pi(a_t|s_t) + V(s_t) - r_t - gamma * V(s_{t+1});
    multi step:   C_t = sum_{l=t}^{n-1} gamma^(l-t) * (log pi(a_l|s_l) - r_l)
                        + V(s_t) - gamma^(n-t) * V(s_n),
  and the loss is 0.5 * residual^2 summed over real tokens and divided by
  max(number of real tokens, 1). C_t = sum_l gamma^(l-t) c_l telescopes, which is
  how it is computed. With token_rewards = 0 these are ALGORITHMS.md's
  0.5 * (log pi - [V(s_{t+1}) - V(s_t)])^2 with target r - V(s_n) on the last token,
  and 0.5 * (sum_{l>=t} log pi - [r - V(s_t)])^2.

  Per-token rewards carry a KL penalty to a reference: the zero-residual policy is
  pi(a|s) = exp(r + gamma * V(s') - V(s)), the soft-optimal policy of an entropy
  bonus of weight 1. For the objective E[R] - tau * KL(pi || pi_ref) pass
  rewards = R / tau and token_rewards = log pi_ref(a_t|s_t); the fixed point is then
  pi* proportional to pi_ref * exp(Q / tau) and the values come out in units of tau.

  Only log pi is trained, which is invariant to shifting all logits of a state, so
  the loss does not itself pull V = logsumexp(logits) towards the soft value (as in
  the paper, whose values come from a Polyak target network). On-policy, the
  multi-step residual from t = 0 needs no values to reach the soft-optimal policy;
  single-step targets at intermediate states are only as good as V_target. Passing the
  learner's own `values` trains them too: V(s_t) at the start of every path is then the
  learner's (with gradient), and only the bootstrap V(s_{t+1}) or V(s_n) is the
  target's, so the single-step residual is the soft Bellman error
  Q(s_t, a_t) - r_t - gamma * V_target(s_{t+1}) of soft Q-learning with a target network.

  Args:
    logprobs: [B, T] log pi_theta(a_t|s_t) of the learner.
    target_values: [B, T + 1] V_target(s_t) of the target network, e.g.
      `soft_values` of its logits; stop-gradiented here.
    rewards: [B] sequence reward, added on each row's last real token.
    token_rewards: [B, T] per-token rewards (e.g. log pi_ref(a_t|s_t)), or None for 0.
    mask: [B, T] bool (or 0/1), True on real tokens.
    terminated: [B] bool, True if the row ends with EOS, False if truncated.
    multi_step: the multi-step residual C_t if True, else the single-step c_t.
    discount: gamma in [0, 1].
    values: [B, T + 1] V_theta(s_t) of the learner (e.g. `soft_values` of its logits),
      or None to use the target's values at the start of each path too.

  Returns:
    (loss, metrics), metrics holding scalar means over real tokens: `loss`,
    `td_error` (|residual|), `mean_logprob`, and `num_real_tokens`.
  """
  chex.assert_rank([logprobs, target_values, mask, rewards, terminated], [2, 2, 2, 1, 1])
  chex.assert_equal_shape([logprobs, mask])
  batch_size, num_steps = jnp.shape(mask)
  chex.assert_shape(target_values, (batch_size, num_steps + 1),
                    custom_message=f'target_values {_VALUES_SHAPE}')
  chex.assert_shape([rewards, terminated], (batch_size,))
  if token_rewards is not None:
    chex.assert_shape(token_rewards, (batch_size, num_steps))
  if values is not None:
    chex.assert_shape(values, (batch_size, num_steps + 1),
                      custom_message=f'values {_VALUES_SHAPE}')
  _check_discount(discount)
  dtype = jnp.promote_types(jnp.result_type(logprobs, target_values), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  terminated = jnp.asarray(terminated).astype(bool)
  logprobs = jnp.asarray(logprobs, dtype)
  target_values = jax.lax.stop_gradient(jnp.asarray(target_values, dtype))
  is_last = (jnp.arange(mask.shape[1])[None, :]
             == token_mdp.last_token_index(mask)[:, None])
  step_rewards = jnp.where(is_last, jnp.asarray(rewards, dtype)[:, None], 0.0)
  if token_rewards is not None:
    step_rewards = step_rewards + jnp.where(mask, jnp.asarray(token_rewards, dtype), 0.0)

  next_values = _next_values(target_values, mask, terminated)
  # `where` before squaring: padding may hold non-finite log-probs or values.
  residuals = jnp.where(
      mask, logprobs + target_values[:, :-1] - step_rewards - discount * next_values, 0.0)
  if values is not None:
    # V_target(s_t) - gamma V_target(s_{t+1}) telescopes over a path: swapping the first
    # V_target(s_t) of each path for the learner's is one correction per start token.
    online_correction = jnp.where(mask, jnp.asarray(values, dtype)[:, :-1] - target_values[:, :-1],
                                  0.0)
  else:
    online_correction = 0.0
  if multi_step:
    def step(later, residual):
      total = residual + discount * later
      return total, total

    # Padding residuals are 0, so each row's sum starts at its last real token.
    _, residuals = jax.lax.scan(
        step, jnp.zeros(mask.shape[0], dtype), residuals.T, reverse=True)
    residuals = residuals.T
  residuals = residuals + online_correction

  num_real_tokens = jnp.sum(mask)
  denominator = jnp.maximum(num_real_tokens, 1)
  loss = jnp.sum(0.5 * jnp.square(residuals)) / denominator
  metrics = {
      'loss': loss,
      'td_error': jnp.sum(jnp.abs(residuals)) / denominator,
      'mean_logprob': jnp.sum(jnp.where(mask, logprobs, 0.0)) / denominator,
      'num_real_tokens': num_real_tokens,
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
