"""Diversity-rewarded CFG distillation (arXiv 2410.06084), as pure losses.

Classifier-free guidance (CFG) samples a music model from
l_cfg = g * l(.|s_t, c) + (1 - g) * l(.|s_t, null): the caption-conditioned logits pushed
away from the unconditional ones (g around 3), at twice the inference cost. Distillation
teaches the student pi_theta(.|s_t, c) to match softmax(l_cfg) of a frozen teacher on the
student's own samples, with the token-level reverse KL; a REINFORCE term rewards the
diversity 1 - cos(E(x_1), E(x_2)) of two generations for the same caption. The learner
adds the two losses with the diversity weight beta; interpolating the weights of a
beta = 0 run and a beta > 0 run gives a deploy-time quality/diversity knob.

Row b is one completion, step t its t-th token; real tokens form a prefix of the row.
Padding entries may hold anything, NaN included; they reach neither loss nor gradients.
"""
import chex
import jax
import jax.numpy as jnp


def cfg_logits(cond_logits: jax.Array, uncond_logits: jax.Array,
               guidance_scale: float) -> jax.Array:
  """Classifier-free guidance logits g * cond + (1 - g) * uncond.

  The coefficients sum to 1, so shifting either input by a per-row constant shifts the
  output by a per-row constant: log-probabilities and raw logits give the same
  softmax.

  Args:
    cond_logits: [..., V] logits of pi(.|s, caption).
    uncond_logits: [..., V] logits of pi(.|s, null caption), same shape.
    guidance_scale: g; 1 is the conditional model, 0 the unconditional, > 1 guidance.

  Returns:
    [..., V] guided logits (not normalised).
  """
  chex.assert_shape(cond_logits, (..., None))
  chex.assert_equal_shape([cond_logits, uncond_logits])
  return (guidance_scale * jnp.asarray(cond_logits)
          + (1.0 - guidance_scale) * jnp.asarray(uncond_logits))


def cfg_distillation_loss(
    student_logits: jax.Array,
    teacher_cond_logits: jax.Array,
    teacher_uncond_logits: jax.Array,
    mask: jax.Array,
    *,
    guidance_scale: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-level reverse KL from the student to the frozen CFG teacher.

  loss = sum_{b,t} mask * KL(pi_theta(.|s_t) || pi_cfg(.|s_t)) / max(sum mask, 1),
  KL(p || q) = sum_v p_v (log p_v - log q_v), pi_cfg = softmax(cfg_logits(cond, uncond,
  g)). The teacher gets no gradient. Reverse KL is mode seeking: the student may drop
  some of the teacher's modes, which is what the diversity reward pushes back against.

  Args:
    student_logits: [B, T, V] logits of pi_theta(.|s_t, c) at each completion step.
    teacher_cond_logits: [B, T, V] the teacher's logits given the caption.
    teacher_uncond_logits: [B, T, V] the teacher's logits given the null caption (the
      same completion prefix after [BOS, NULL_CAPTION]).
    mask: [B, T] bool (or 0/1), True on real tokens.
    guidance_scale: g of `cfg_logits`.

  Returns:
    (loss, metrics), scalars: `loss` (= `reverse_kl`, the mean per real token),
    `student_entropy` and `teacher_entropy` (of pi_cfg) per real token,
    `argmax_agreement` (share of real tokens where both pick the same token) and
    `num_tokens`.
  """
  chex.assert_rank([student_logits, teacher_cond_logits, teacher_uncond_logits, mask],
                   [3, 3, 3, 2])
  # One shape: the student and the teacher share a vocabulary.
  chex.assert_equal_shape([student_logits, teacher_cond_logits, teacher_uncond_logits])
  chex.assert_shape(student_logits, (*jnp.shape(mask), None))

  dtype = jnp.promote_types(jnp.result_type(student_logits, teacher_cond_logits,
                                            teacher_uncond_logits), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  real = mask[..., None]
  # Padding may be NaN: replace it before any arithmetic so no NaN reaches a gradient.
  student = jnp.where(real, jnp.asarray(student_logits, dtype), 0.0)
  teacher = jax.lax.stop_gradient(cfg_logits(
      jnp.where(real, jnp.asarray(teacher_cond_logits, dtype), 0.0),
      jnp.where(real, jnp.asarray(teacher_uncond_logits, dtype), 0.0), guidance_scale))
  student_logprobs = jax.nn.log_softmax(student)
  teacher_logprobs = jax.nn.log_softmax(teacher)
  student_probs = jnp.exp(student_logprobs)
  token_kl = jnp.sum(student_probs * (student_logprobs - teacher_logprobs), axis=-1)
  num_tokens = jnp.sum(mask)
  denominator = jnp.maximum(num_tokens, 1).astype(dtype)

  def token_mean(values):
    return jnp.sum(jnp.where(mask, values, 0.0)) / denominator

  loss = token_mean(token_kl)
  metrics = {
      'loss': loss,
      'reverse_kl': loss,
      'student_entropy': token_mean(-jnp.sum(student_probs * student_logprobs, axis=-1)),
      'teacher_entropy': token_mean(
          -jnp.sum(jnp.exp(teacher_logprobs) * teacher_logprobs, axis=-1)),
      'argmax_agreement': token_mean(
          (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(dtype)),
      'num_tokens': num_tokens,
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def diversity_reinforce_loss(
    logprobs: jax.Array,
    mask: jax.Array,
    diversity_rewards: jax.Array,
    *,
    baseline: str = 'mean',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REINFORCE on a sequence-level diversity reward.

  loss = -mean_b [ sum_t mask * log pi(y_t|s_t) * sg(r_b - baseline) ], whose gradient
  estimates -grad E[r]. Put both generations of a caption in the batch, each with the
  pair's reward 1 - cos(E(x_1), E(x_2)): then both are pushed apart.

  Args:
    logprobs: [B, T] log pi_theta(y_t|s_t) of the sampled completions.
    mask: [B, T] bool (or 0/1), True on real tokens.
    diversity_rewards: [B] one reward per completion.
    baseline: 'mean' subtracts the batch mean of the rewards (variance reduction; the
      batch's own rewards make it slightly biased, as in the paper), 'none' nothing.

  Returns:
    (loss, metrics), scalars: `loss`, `diversity_reward` (batch mean), `advantage_std`
    and `completion_length` (mean real tokens per row).
  """
  chex.assert_rank([logprobs, mask, diversity_rewards], [2, 2, 1])
  chex.assert_equal_shape([logprobs, mask])
  chex.assert_shape(diversity_rewards, (jnp.shape(mask)[0],))
  if baseline not in ('mean', 'none'):
    raise ValueError(f"baseline must be 'mean' or 'none'; got {baseline!r}.")

  dtype = jnp.promote_types(jnp.result_type(logprobs), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  logprobs = jnp.where(mask, jnp.asarray(logprobs, dtype), 0.0)
  rewards = jnp.asarray(diversity_rewards, dtype)
  advantages = rewards - jnp.mean(rewards) if baseline == 'mean' else rewards
  advantages = jax.lax.stop_gradient(advantages)
  loss = -jnp.mean(jnp.sum(logprobs, axis=1) * advantages)
  metrics = {
      'loss': loss,
      'diversity_reward': jnp.mean(rewards),
      'advantage_std': jnp.std(advantages),
      'completion_length': jnp.mean(jnp.sum(mask, axis=1)),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
