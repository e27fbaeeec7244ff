"""Nash-MD-PG: policy-gradient Nash mirror descent against a preference model
(arXiv 2312.00886).

Row b is one completion y ~ pi_theta, step t its t-th token, real tokens form a
prefix of the row; y' was sampled from the geometric mixture of pi_theta and pi_ref
(`geometric_mixture_logits`) and `preferences[b]` = P(y > y' | x). Padding entries
may hold anything, NaN included; they reach neither loss nor gradients.
"""
import chex
import jax
import jax.numpy as jnp


def geometric_mixture_logits(policy_logits: jax.Array, reference_logits: jax.Array,
                             mixture_coef: float) -> jax.Array:
  """Normalised log-probabilities of pi^beta proportional to pi^(1-beta) * pi_ref^beta.

  log_softmax((1 - beta) * log_softmax(policy) + beta * log_softmax(reference)).
  Since log_softmax only shifts its input, softmax((1 - beta) * policy_logits +
  beta * reference_logits) is the same distribution; normalising first keeps the
  output a proper log-probability and the intermediate values small.

  Args:
    policy_logits: [..., V] logits of pi_theta(.|s).
    reference_logits: [..., V] logits of pi_ref(.|s), same shape.
    mixture_coef: beta in [0, 1]; 0 is pi_theta, 1 is pi_ref.

  Returns:
    [..., V] log pi^beta(.|s), normalised over the last axis.
  """
  chex.assert_shape(policy_logits, (..., None))
  chex.assert_equal_shape([policy_logits, reference_logits])
  if not 0.0 <= mixture_coef <= 1.0:
    raise ValueError(f'mixture_coef must be in [0, 1]; got {mixture_coef}.')
  dtype = jnp.promote_types(jnp.result_type(policy_logits, reference_logits), jnp.float32)
  mixed = ((1.0 - mixture_coef) * jax.nn.log_softmax(jnp.asarray(policy_logits, dtype))
           + mixture_coef * jax.nn.log_softmax(jnp.asarray(reference_logits, dtype)))
  return jax.nn.log_softmax(mixed)


def nash_md_loss(
    logprobs: jax.Array,
    reference_logprobs: jax.Array,
    preferences: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Nash-MD-PG surrogate loss, in TRL's simple form.

  loss = mean_b [ tau * sum_t sg(log pi(y_t) - log pi_ref(y_t)) * log pi(y_t)
                  - (P(y > y') - 1/2) * sum_t log pi(y_t) ],
  sums over real tokens, tau = kl_coef. Its gradient estimates
  E[grad log pi(y) * (P(y > y') - 1/2 - tau * log pi(y) / pi_ref(y))] except that
  each token's score is weighted by its own log-ratio only, not the sequence's: TRL's
  biased but lower-variance per-token KL term (exact for one-token answers). TRL
  calls tau `beta` and the mixture coefficient `mixture_coef`.

  Args:
    logprobs: [B, T] log pi_theta(y_t|s_t) of the completion y.
    reference_logprobs: [B, T] log pi_ref(y_t|s_t) of the same tokens.
    preferences: [B] P(y > y' | x) in [0, 1] against the mixture sample y'.
    mask: [B, T] bool (or 0/1), True on real tokens.
    kl_coef: tau >= 0, the KL-to-reference regularisation.

  Returns:
    (loss, metrics), scalar batch means: `loss`, `kl_to_reference` (sequence sum of
    the log-ratio), `preference` (the win rate against the mixture opponent),
    `pg_loss` (the preference term), `kl_loss` (the surrogate of the KL term) and
    `completion_length`.
  """
  chex.assert_rank([logprobs, reference_logprobs, mask, preferences], [2, 2, 2, 1])
  chex.assert_equal_shape([logprobs, reference_logprobs, mask])
  chex.assert_shape(preferences, (jnp.shape(mask)[0],))
  if not kl_coef >= 0:
    raise ValueError(f'kl_coef (tau) must be >= 0; got {kl_coef}.')

  dtype = jnp.promote_types(jnp.result_type(logprobs, reference_logprobs), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  logprobs = jnp.where(mask, jnp.asarray(logprobs, dtype), 0.0)
  log_ratios = jax.lax.stop_gradient(
      jnp.where(mask, logprobs - jnp.asarray(reference_logprobs, dtype), 0.0))
  preferences = jnp.asarray(preferences, dtype)

  sequence_logprobs = jnp.sum(logprobs, axis=1)
  kl_loss = jnp.mean(jnp.sum(log_ratios * logprobs, axis=1))
  pg_loss = -jnp.mean((preferences - 0.5) * sequence_logprobs)
  loss = kl_coef * kl_loss + pg_loss
  metrics = {
      'loss': loss,
      'kl_to_reference': jnp.mean(jnp.sum(log_ratios, axis=1)),
      'preference': jnp.mean(preferences),
      'pg_loss': pg_loss,
      'kl_loss': kl_loss,
      'completion_length': jnp.mean(jnp.sum(mask, axis=1)),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
