"""The token-level MDP of a batch of completions: per-token rewards and discounts.

Tokens are actions and transitions are deterministic, so a batch of completions of
padded length T maps to T steps per row. Step t of row b is real when
`completion_mask[b, t]`; real tokens form a prefix of the row. A row of length L
bootstraps from V(s_L), the value of the prefix after its last real token, unless
its episode terminated (EOS sampled).
"""
import jax
import jax.numpy as jnp


def _check_rank(name: str, array: jax.Array, rank: int, shape_doc: str):
  if jnp.ndim(array) != rank:
    raise ValueError(
        f'{name} must have rank {rank} ({shape_doc}) but has shape {jnp.shape(array)}.')


def _check_same_shape(names_and_arrays: list[tuple[str, jax.Array]]):
  (first_name, first), *rest = names_and_arrays
  for name, array in rest:
    if jnp.shape(array) != jnp.shape(first):
      raise ValueError(
          f'{name} has shape {jnp.shape(array)} but {first_name} has shape '
          f'{jnp.shape(first)}; both must be [B, T].')


def _check_batch(completion_mask: jax.Array, name: str, per_row: jax.Array):
  _check_rank(name, per_row, 1, '[B]')
  if jnp.shape(per_row)[0] != jnp.shape(completion_mask)[0]:
    raise ValueError(
        f'{name} has {jnp.shape(per_row)[0]} rows but completion_mask has shape '
        f'{jnp.shape(completion_mask)}; give one entry per completion.')


def last_token_index(completion_mask: jax.Array) -> jax.Array:
  """Position of each row's last real token.

  Args:
    completion_mask: [B, T] bool (or 0/1), True on real tokens.

  Returns:
    [B] int32, the largest t with `completion_mask[b, t]`, or -1 for a row with no
    real token (such a row then gets no task reward and no special discount).
  """
  _check_rank('completion_mask', completion_mask, 2, '[B, T]')
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
  _check_rank('completion_mask', completion_mask, 2, '[B, T]')
  _check_same_shape([('completion_mask', completion_mask),
                     ('behaviour_logprobs', behaviour_logprobs),
                     ('reference_logprobs', reference_logprobs)])
  _check_batch(completion_mask, 'task_rewards', task_rewards)
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
  _check_rank('completion_mask', completion_mask, 2, '[B, T]')
  _check_batch(completion_mask, 'terminated', terminated)
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma must be in [0, 1]; got {gamma}.')
  mask = jnp.asarray(completion_mask).astype(bool)
  terminated = jnp.asarray(terminated).astype(bool)
  ends_episode = _is_last_token(mask) & terminated[:, None]
  return jnp.where(mask & ~ends_episode, jnp.float32(gamma), jnp.float32(0.0))


def check_shapes(batch_time: dict[str, jax.Array], values_name: str, values: jax.Array,
                 per_row: dict[str, jax.Array]):
  """Raises ValueError unless `batch_time` arrays are [B, T], values [B, T + 1], per-row [B].

  The shared argument check of the token-level losses (vtrace, soft_q).
  """
  for name, array in batch_time.items():
    if jnp.ndim(array) != 2:
      raise ValueError(f'{name} must be [B, T] (rank 2) but has shape {jnp.shape(array)}.')
  shapes = {name: jnp.shape(array) for name, array in batch_time.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f'These must all have the same shape [B, T]; got {shapes}.')
  batch_size, num_steps = next(iter(shapes.values()))
  if jnp.shape(values) != (batch_size, num_steps + 1):
    raise ValueError(
        f'{values_name} must be [B, T + 1] = {(batch_size, num_steps + 1)} (V(s_0) .. '
        f'V(s_T), the last one bootstraps) but has shape {jnp.shape(values)}.')
  for name, array in per_row.items():
    if jnp.shape(array) != (batch_size,):
      raise ValueError(
          f'{name} must be [B] = {(batch_size,)}, one entry per completion, but has '
          f'shape {jnp.shape(array)}.')
