"""Direct alignment from preference pairs: DPO (arXiv 2305.18290) and IPO (arXiv 2310.12036).

A pair is a prompt x with a preferred completion y+ and a dispreferred one y-. Both
losses are functions of the margin of the policy's log-ratios to the frozen reference,

  h = log pi(y+|x) / pi_ref(y+|x) - log pi(y-|x) / pi_ref(y-|x),

with sequence log-probabilities (sums over real tokens, `sequence_log_ratios`):
  DPO: -log sigmoid(beta * h);     IPO: (h - 1 / (2 tau))^2.
DPO pushes h up ever more slowly (a Bradley-Terry likelihood); IPO regresses h onto a
fixed margin, so deterministic or near-deterministic preferences cannot drive it to
infinity. Online AI feedback (arXiv 2402.04792) uses them on pairs the current policy
sampled; offline DPO on a fixed dataset.
"""
import chex
import jax
import jax.numpy as jnp


def sequence_log_ratios(logprobs: jax.Array, reference_logprobs: jax.Array,
                        mask: jax.Array) -> jax.Array:
  """log pi(y|x) - log pi_ref(y|x) of each completion: the sum over its real tokens.

  Args:
    logprobs: [B, T] log pi(y_t|x, y_<t).
    reference_logprobs: [B, T] log pi_ref(y_t|x, y_<t) (constants: the reference is frozen).
    mask: [B, T] bool (or 0/1), True on real tokens; padding may hold anything, NaN too.

  Returns:
    [B] the sequence log-ratios, at least float32.
  """
  chex.assert_rank([logprobs, reference_logprobs, mask], 2)
  chex.assert_equal_shape([logprobs, reference_logprobs, mask])
  dtype = jnp.promote_types(jnp.result_type(logprobs, reference_logprobs), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  log_ratios = (jnp.where(mask, jnp.asarray(logprobs, dtype), 0.0)
                - jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(reference_logprobs, dtype),
                                                  0.0)))
  return jnp.sum(log_ratios, axis=1)


def _pair_metrics(chosen_log_ratios, rejected_log_ratios, margins, loss):
  return jax.tree_util.tree_map(jax.lax.stop_gradient, {
      'loss': loss,
      'margin': jnp.mean(margins),
      'pair_accuracy': jnp.mean(margins > 0),
      'chosen_log_ratio': jnp.mean(chosen_log_ratios),
      'rejected_log_ratio': jnp.mean(rejected_log_ratios),
  })


def _margins(chosen_log_ratios, rejected_log_ratios):
  chex.assert_rank([chosen_log_ratios, rejected_log_ratios], 1)
  chex.assert_equal_shape([chosen_log_ratios, rejected_log_ratios])
  return chosen_log_ratios - rejected_log_ratios


def dpo_loss(chosen_log_ratios: jax.Array, rejected_log_ratios: jax.Array, *,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO: mean over pairs of -log sigmoid(beta * h) = softplus(-beta * h).

  As beta -> 0 the loss tends to log 2 - beta * h / 2 and its gradient to -beta / 2 *
  grad h: every pair pushes its margin up with the same weight, whatever it already is.

  Args:
    chosen_log_ratios: [B] log pi(y+|x) - log pi_ref(y+|x) (`sequence_log_ratios`).
    rejected_log_ratios: [B] the same for y-.
    beta: > 0, the inverse strength of the implicit KL regularisation.

  Returns:
    (loss, metrics): `loss`, `margin` (mean h), `pair_accuracy` (share with h > 0),
    `chosen_log_ratio`, `rejected_log_ratio` (batch means).
  """
  margins = _margins(chosen_log_ratios, rejected_log_ratios)
  if not beta > 0:
    raise ValueError(f'beta must be > 0; got {beta}.')
  loss = jnp.mean(jax.nn.softplus(-beta * margins))
  return loss, _pair_metrics(chosen_log_ratios, rejected_log_ratios, margins, loss)


def ipo_loss(chosen_log_ratios: jax.Array, rejected_log_ratios: jax.Array, *,
             tau: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IPO: mean over pairs of (h - 1 / (2 tau))^2; its minimum, gradient 0, is h = 1 / (2 tau).

  Args:
    chosen_log_ratios: [B] log pi(y+|x) - log pi_ref(y+|x) (`sequence_log_ratios`).
    rejected_log_ratios: [B] the same for y-.
    tau: > 0, the regularisation: the target margin is 1 / (2 tau).

  Returns:
    (loss, metrics) as for `dpo_loss`.
  """
  margins = _margins(chosen_log_ratios, rejected_log_ratios)
  if not tau > 0:
    raise ValueError(f'tau must be > 0; got {tau}.')
  loss = jnp.mean(jnp.square(margins - 1.0 / (2.0 * tau)))
  return loss, _pair_metrics(chosen_log_ratios, rejected_log_ratios, margins, loss)
