"""Generalized knowledge distillation (GKD, arXiv 2306.13649), as a pure loss.

The student Q = pi_theta(.|s_t) learns the teacher P = pi_T(.|s_t) token by token, over the
whole vocabulary, with the generalized Jensen-Shannon divergence

    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M),   M = beta P + (1 - beta) Q

on sequences that are the student's own samples (on-policy, with probability lambda in
the agent) or the teacher's. M is formed in log space, log M = logsumexp(log beta + log P,
log(1 - beta) + log Q), so no probability underflows. As beta -> 0 the divergence tends to
beta * KL(P || Q), as beta -> 1 to (1 - beta) * KL(Q || P); at the end points themselves
the loss is those limits' KLs, as in the paper and TRL's GKDTrainer:

    beta = 0: KL(P || Q), the forward KL (teacher first: mode covering; supervised KD);
    beta = 1: KL(Q || P), the reverse KL (student first: mode seeking).

Row b is one completion, step t its t-th token; real tokens form a prefix of the row.
Padding entries may hold anything, NaN included; they reach neither loss nor gradients.
"""
import chex
import jax
import jax.numpy as jnp


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_jsd(student_logprobs: jax.Array, teacher_logprobs: jax.Array,
              beta: float) -> jax.Array:
  """JSD_beta(teacher || student) per token (see the module docstring for the end points).

  Args:
    student_logprobs: [..., V] log Q, normalised over the last axis.
    teacher_logprobs: [..., V] log P, the same shape.
    beta: in [0, 1].

  Returns:
    [...] the divergence at each position.
  """
  chex.assert_equal_shape([student_logprobs, teacher_logprobs])
  if not 0 <= beta <= 1:
    raise ValueError(f'The GKD beta must be in [0, 1]; got {beta}.')
  if beta == 0:
    return _kl(teacher_logprobs, student_logprobs)
  if beta == 1:
    return _kl(student_logprobs, teacher_logprobs)
  log_mixture = jnp.logaddexp(jnp.log(beta) + teacher_logprobs,
                              jnp.log1p(-beta) + student_logprobs)
  return (beta * _kl(teacher_logprobs, log_mixture)
          + (1 - beta) * _kl(student_logprobs, log_mixture))


def gkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean generalized JSD per real token; the teacher gets no gradient.

  loss = sum_{b,t} mask * JSD_beta(P(.|s_t) || Q(.|s_t)) / max(sum mask, 1).

  Args:
    student_logits: [B, T, V] the student's logits at each completion step.
    teacher_logits: [B, T, V] the teacher's logits on the same prefixes.
    mask: [B, T] bool (or 0/1), True on real tokens.
    beta: of JSD_beta: 0 forward KL(teacher || student), 1 reverse KL(student || teacher).

  Returns:
    (loss, metrics), scalars: `loss`, `forward_kl` and `reverse_kl` per real token,
    `argmax_agreement` (share of real tokens where both pick the same token),
    `student_entropy` and `teacher_entropy` per real token.
  """
  chex.assert_rank([student_logits, teacher_logits, mask], [3, 3, 2])
  chex.assert_equal_shape([student_logits, teacher_logits])
  chex.assert_shape(student_logits, (*jnp.shape(mask), None))
  dtype = jnp.promote_types(jnp.result_type(student_logits, teacher_logits), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  real = mask[..., None]
  # Padding may be NaN: replaced before any arithmetic so that no NaN reaches a gradient.
  student = jax.nn.log_softmax(jnp.where(real, jnp.asarray(student_logits, dtype), 0.0))
  teacher = jax.lax.stop_gradient(
      jax.nn.log_softmax(jnp.where(real, jnp.asarray(teacher_logits, dtype), 0.0)))
  denominator = jnp.maximum(jnp.sum(mask), 1).astype(dtype)

  def token_mean(values):
    return jnp.sum(jnp.where(mask, values, 0.0)) / denominator

  loss = token_mean(token_jsd(student, teacher, beta))
  metrics = {
      'loss': loss,
      'forward_kl': token_mean(_kl(teacher, student)),
      'reverse_kl': token_mean(_kl(student, teacher)),
      'argmax_agreement': token_mean(
          (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(dtype)),
      'student_entropy': token_mean(-jnp.sum(jnp.exp(student) * student, axis=-1)),
      'teacher_entropy': token_mean(-jnp.sum(jnp.exp(teacher) * teacher, axis=-1)),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
