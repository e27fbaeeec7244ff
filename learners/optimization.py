"""The optimiser step every trainer in Chorus takes: the learner, the warm start, reward models.

A trainer's loss is `loss_fn(params, *args) -> (loss, metrics)`; `optimizer_step` turns it
into new parameters and optimiser state. Callers jit it (with their own loss bound) and keep
what is theirs around it, such as the learner's auxiliary networks.
"""
from collections.abc import Callable
from typing import Any

import jax
import optax

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(learning_rate: float, max_grad_norm: float, decay_steps: int = 0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
  """Adam on gradients clipped to a global norm of `max_grad_norm` (the RL learners').

  With `warmup_steps` > 0 the learning rate rises linearly from 0 to `learning_rate` over
  those steps. With `decay_steps` > 0 it then falls linearly to 0 at step `decay_steps`.
  The step count is in the optimiser state, so a restored learner resumes the schedule.
  """
  if 0 < decay_steps <= warmup_steps:
    raise ValueError(f'The learning-rate warm-up ({warmup_steps} steps) must end before '
                     f'its decay does (step {decay_steps}); shorten the warm-up.')
  after_warmup = (optax.linear_schedule(learning_rate, 0.0, decay_steps - warmup_steps)
                  if decay_steps > 0 else optax.constant_schedule(learning_rate))
  schedule = after_warmup
  if warmup_steps > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), after_warmup],
        [warmup_steps])
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule))


def optimizer_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, params: Any,
                   opt_state: optax.OptState, *args) -> tuple[Any, optax.OptState, dict]:
  """One gradient step on `loss_fn(params, *args)`.

  Args:
    loss_fn: `(params, *args) -> (loss, metrics)`, differentiable in `params`.
    optimizer: the optax transformation that `opt_state` belongs to.
    params: the parameters to update.
    opt_state: `optimizer`'s state for `params`.
    *args: the rest of `loss_fn`'s arguments (a batch, auxiliary parameters).

  Returns:
    (params, opt_state, metrics): the updated parameters and state, and `loss_fn`'s
    metrics at the old parameters plus `grad_norm`, the global norm of the gradient
    before any clipping the optimizer does.
  """
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {**metrics, 'grad_norm': optax.global_norm(grads)}
