"""Supervised warm start: token-level maximum likelihood on demonstrations."""
from collections.abc import Iterator
import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import optimization
from chorus.learners import policy


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """Supervised warm start of the policy on a task's demonstrations.

  Attributes:
    steps: optimiser steps (0 skips the warm start: RL starts from random weights).
    batch_size: demonstrations per step.
    learning_rate: Adam learning rate.
    dataset: RLDS dataset directory to learn from instead of the task's demonstrations
      (e.g. a run's rlds/ folder after `chorus datasets filter --min-reward 1`); empty
      uses the task's.
    init: an orbax checkpoint directory of policy parameters of the experiment's model
      (another run's checkpoints/warm_start, or a merged policy written by `chorus
      merge-runs`) to start from instead of the model's initial parameters; with
      `steps=0` the run starts exactly there. Stored as an absolute path.
  """
  steps: int = 400
  batch_size: int = 64
  learning_rate: float = 3e-3
  dataset: str = ''
  init: str = ''

  def __post_init__(self):
    if self.init:  # Every node, wherever it starts, reads the same directory.
      object.__setattr__(self, 'init', os.path.abspath(self.init))

  def __post_init__(self):
    core.check_ranges(self, 'warm_start', steps=(0, None), batch_size=(1, None),
                      learning_rate=(0, 10.0))


def token_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean negative log-likelihood per real token.

  Args:
    logprobs: [B, T] log pi(a_t | s_t) of the demonstrated tokens.
    mask: [B, T] True on real tokens.
  Returns:
    (loss, metrics) with loss = -sum(mask * logprobs) / max(sum(mask), 1).
  """
  chex.assert_rank([logprobs, mask], 2)
  chex.assert_equal_shape([logprobs, mask])
  mask = mask.astype(logprobs.dtype)
  loss = -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {'nll': loss}


def warm_start(decoder_config: models.DecoderConfig, config: WarmStartConfig,
               demonstrations: Iterator[core.TrajectoryBatch], params) -> tuple[object, list[dict]]:
  """Fits `params` to demonstrations with Adam.

  Returns:
    (params, history): the new parameters and per-step metrics ('step', 'nll',
    'grad_norm').
  """
  def loss_fn(params, batch):
    outputs = policy.evaluate_actions(decoder_config, params, batch)
    return token_nll(outputs.logprobs, batch.completion_mask)

  optimizer = optax.adam(config.learning_rate)
  update = jax.jit(functools.partial(optimization.optimizer_step, loss_fn, optimizer))
  opt_state = optimizer.init(params)
  history = []
  for step in range(config.steps):
    params, opt_state, metrics = update(params, opt_state, next(demonstrations))
    history.append({'step': step, **jax.device_get(metrics)})
  return params, history
