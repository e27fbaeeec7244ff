"""GRPO: group-relative policy optimisation (DeepSeekMath, arXiv 2402.03300).

G completions are sampled for each prompt; each completion's advantage is its reward
standardised within its group (`group_advantages`, computed where the group is known: in
the actor's rollout) and is the same for every token of the completion. The loss
(`grpo_loss`) is PPO's clipped surrogate with that advantage, against the behaviour
policy mu that sampled, plus a KL penalty to the frozen reference with the k3 estimator;
there is no value function.

Row b of a batch is one completion, step t its t-th token, real tokens form a prefix of
the row. Padding entries may hold anything, NaN included; they reach neither loss nor
gradients.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from chorus.learners import ppo

NORMALISATIONS = ('sequence', 'token')


def group_advantages(rewards: np.ndarray, *, epsilon: float) -> np.ndarray:
  """A_i = (R_i - mean_j R_j) / (std_j R_j + epsilon) within each group.

  The standard deviation is the population one (divides by G), so a group's advantages
  have variance just under 1; a group whose rewards are all equal gets 0 everywhere.
  NumPy, because the actors compute it for each batch of groups they sample.

  Args:
    rewards: [N, G] rewards of N groups of G completions (one group per prompt).
    epsilon: > 0, keeps near-constant groups from blowing up.

  Returns:
    [N, G] float64 advantages.
  """
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 2:
    raise ValueError(f'rewards must be [groups, group_size]; got shape {rewards.shape}.')
  if not epsilon > 0:
    raise ValueError(f'epsilon must be > 0; got {epsilon}.')
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  advantages = centred / (rewards.std(axis=1, keepdims=True) + epsilon)
  # Exactly 0 for equal rewards: a mean of equal floats can be off by an ulp.
  equal = np.all(rewards == rewards[:, :1], axis=1, keepdims=True)
  return np.where(equal, 0.0, advantages)


def k3_kl(logprobs: jax.Array, reference_logprobs: jax.Array) -> jax.Array:
  """The k3 estimator of KL(pi || pi_ref) per sampled token (Schulman's "approximating KL").

  pi_ref/pi - log(pi_ref/pi) - 1: non-negative, 0 where pi = pi_ref, and unbiased for the
  KL when the tokens are drawn from pi.

  Args:
    logprobs: [...] log pi(a_t|s_t).
    reference_logprobs: [...] log pi_ref(a_t|s_t), same shape.

  Returns:
    [...] the estimate per token.
  """
  chex.assert_equal_shape([logprobs, reference_logprobs])
  log_ratio = reference_logprobs - logprobs
  return jnp.exp(log_ratio) - log_ratio - 1.0


def grpo_loss(
    logprobs: jax.Array,
    behaviour_logprobs: jax.Array,
    reference_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_epsilon: float = 0.2,
    kl_coef: float = 0.04,
    normalisation: str = 'sequence',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO's loss: the clipped surrogate with per-completion advantages plus beta * k3 KL.

  Per real token: -min(r_t A_b, clip(r_t, 1 - eps, 1 + eps) A_b) + kl_coef * KL_t, with
  r_t = pi(a_t|s_t) / mu(a_t|s_t) and KL_t = `k3_kl`. Averaged over tokens in one of two
  ways, which weigh long and short completions differently:
    'sequence': the mean over each completion's real tokens, then over completions
      (the paper's 1/G sum_i 1/|o_i| sum_t);
    'token': the mean over every real token of the batch (longer completions weigh more).

  Args:
    logprobs: [B, T] log pi(a_t|s_t) of the learner policy.
    behaviour_logprobs: [B, T] log mu(a_t|s_t), the policy that sampled.
    reference_logprobs: [B, T] log pi_ref(a_t|s_t), constants.
    advantages: [B] A_b of each completion (`group_advantages`), constants.
    mask: [B, T] bool (or 0/1), True on real tokens.
    clip_epsilon: eps of the ratio clip, > 0.
    kl_coef: beta >= 0, the KL penalty's weight (0 turns it off).
    normalisation: 'sequence' or 'token', see above.

  Returns:
    (loss, metrics): `loss`, `pg_loss`, `kl` (the k3 estimate, averaged like the loss),
    `kl_to_reference` (sequence sum of log pi - log pi_ref, batch mean), `clip_fraction`,
    `mean_abs_log_ratio` (policy lag), `mean_abs_advantage`, `zero_advantage_fraction`
    (completions whose group had equal rewards: no learning signal).
  """
  chex.assert_rank([logprobs, behaviour_logprobs, reference_logprobs, mask, advantages],
                   [2, 2, 2, 2, 1])
  chex.assert_equal_shape([logprobs, behaviour_logprobs, reference_logprobs, mask])
  chex.assert_shape(advantages, (jnp.shape(mask)[0],))
  if not kl_coef >= 0:
    raise ValueError(f'kl_coef must be >= 0; got {kl_coef}.')
  if normalisation not in NORMALISATIONS:
    raise ValueError(f'normalisation must be one of {NORMALISATIONS}; got {normalisation!r}.')
  dtype = jnp.promote_types(jnp.result_type(logprobs, behaviour_logprobs), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  # `where` before any arithmetic, so that non-finite padding cannot make NaN gradients.
  logprobs = jnp.where(mask, jnp.asarray(logprobs, dtype), 0.0)
  behaviour_logprobs = jnp.where(mask, jnp.asarray(behaviour_logprobs, dtype), 0.0)
  reference_logprobs = jax.lax.stop_gradient(
      jnp.where(mask, jnp.asarray(reference_logprobs, dtype), 0.0))
  advantages = jax.lax.stop_gradient(jnp.asarray(advantages, dtype))
  log_ratios = logprobs - behaviour_logprobs
  surrogate = ppo.clipped_surrogate(log_ratios, jnp.broadcast_to(advantages[:, None],
                                                                 log_ratios.shape),
                                    clip_epsilon=clip_epsilon)
  kl = k3_kl(logprobs, reference_logprobs)
  lengths = jnp.sum(mask, axis=1)

  def average(per_token):
    per_token = jnp.where(mask, per_token, 0.0)
    if normalisation == 'sequence':
      return jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(lengths, 1))
    return jnp.sum(per_token) / jnp.maximum(jnp.sum(lengths), 1)

  pg_loss = average(-surrogate)
  mean_kl = average(kl)
  loss = pg_loss + kl_coef * mean_kl
  metrics = {
      'loss': loss,
      'pg_loss': pg_loss,
      'kl': mean_kl,
      'kl_to_reference': jnp.mean(jnp.sum(logprobs - reference_logprobs, axis=1)),
      'clip_fraction': average(ppo.outside_clip_range(log_ratios, clip_epsilon)),
      'mean_abs_log_ratio': average(jnp.abs(log_ratios)),
      'mean_abs_advantage': jnp.mean(jnp.abs(advantages)),
      'zero_advantage_fraction': jnp.mean(advantages == 0),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
