"""The token-level MDP of a batch of completions: per-token rewards and discounts.

Tokens are actions and transitions are deterministic, so a batch of completions of
padded length T maps to T steps per row. Step t of row b is real when
`completion_mask[b, t]`; real tokens form a prefix of the row. A row of length L
bootstraps from V(s_L), the value of the prefix after its last real token, unless
its episode terminated (EOS sampled).
"""
import chex
import jax
import jax.numpy as jnp


def last_token_index(completion_mask: jax.Array) -> jax.Array:
  """Position of each row's last real token.

  Args:
    completion_mask: [B, T] bool (or 0/1), True on real tokens.

  Returns:
    [B] int32, the largest t with `completion_mask[b, t]`, or -1 for a row with no
    real token (such a row then gets no task reward and no special discount).
  """
  chex.assert_rank(completion_mask, 2)
  mask = jnp.asarray(completion_mask).astype(bool)
  positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask, positions, -1), axis=1)


def _is_last_token(completion_mask: jax.Array) -> jax.Array:
  """[B, T] bool, True exactly at each row's last real token."""
  last = last_token_index(completion_mask)
  positions = jnp.arange(jnp.shape(completion_mask)[1], dtype=jnp.int32)
  return positions[None, :] == last[:, None]


def token_rewards(
    task_rewards: jax.Array,
    completion_mask: jax.Array,
    behaviour_logprobs: jax.Array,
    reference_logprobs: jax.Array,
    kl_coef: float,
) -> jax.Array:
  """Per-token rewards with a KL penalty to a frozen reference folded in.

  r_t = -kl_coef * (log mu(a_t|s_t) - log pi_ref(a_t|s_t)) on every real token, plus
  the sequence's task reward on its last real token. The penalty uses the behaviour
  policy mu because it is what sampled a_t, so its sum is a one-sample estimate of
  KL(mu || pi_ref) of the completion.

  Args:
    task_rewards: [B] task reward R(x, y) of each completion.
    completion_mask: [B, T] bool, True on real tokens.
    behaviour_logprobs: [B, T] log mu(a_t|s_t) of the sampled tokens.
    reference_logprobs: [B, T] log pi_ref(a_t|s_t) of the sampled tokens.
    kl_coef: weight of the KL penalty, >= 0 (0 turns it off).

  Returns:
    [B, T] rewards, 0 on padding (whatever the log-probs hold there).
  """
  chex.assert_rank([completion_mask, behaviour_logprobs, reference_logprobs, task_rewards],
                   [2, 2, 2, 1])
  chex.assert_equal_shape([completion_mask, behaviour_logprobs, reference_logprobs])
  chex.assert_shape(task_rewards, (jnp.shape(completion_mask)[0],))
  if kl_coef < 0:
    raise ValueError(f'kl_coef must be >= 0 to penalise divergence; got {kl_coef}.')
  mask = jnp.asarray(completion_mask).astype(bool)
  kl_penalty = -kl_coef * (jnp.asarray(behaviour_logprobs) - jnp.asarray(reference_logprobs))
  # `where`, not a product, so that non-finite padding log-probs cannot leak in.
  rewards = jnp.where(mask, kl_penalty, 0.0)
  task_rewards = jnp.asarray(task_rewards, dtype=rewards.dtype)
  return rewards + jnp.where(_is_last_token(mask), task_rewards[:, None], 0.0)


def token_discounts(
    completion_mask: jax.Array,
    terminated: jax.Array,
    gamma: float = 1.0,
) -> jax.Array:
  """Per-token discounts: gamma_t multiplies V(s_{t+1}) in the target of step t.

  Args:
    completion_mask: [B, T] bool, True on real tokens.
    terminated: [B] bool, True if EOS was sampled, False if the length cap truncated
      the completion.
    gamma: discount of a real step, in [0, 1]; 1 for text.

  Returns:
    [B, T] float32: gamma on real tokens except the last one of a terminated row,
    which gets 0 (no value after EOS); a truncated row keeps gamma there so the
    learner bootstraps from V(s_L). 0 on padding.
  """
  chex.assert_rank([completion_mask, terminated], [2, 1])
  chex.assert_shape(terminated, (jnp.shape(completion_mask)[0],))
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma must be in [0, 1]; got {gamma}.')
  mask = jnp.asarray(completion_mask).astype(bool)
  terminated = jnp.asarray(terminated).astype(bool)
  ends_episode = _is_last_token(mask) & terminated[:, None]
  return jnp.where(mask & ~ends_episode, jnp.float32(gamma), jnp.float32(0.0))

