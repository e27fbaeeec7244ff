"""V-trace learners start their value head at 0 and their policy where the warm start left it."""
import dataclasses

import jax
import numpy as np

from chorus import core
from chorus import models
from chorus.actors import demonstrations
from chorus.actors import reverse_digits
from chorus.agents import builder as builder_lib
from chorus.agents import vtrace
from chorus.agents import warp
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.models import lora


def test_vtrace_and_warp_learners_start_the_critic_at_zero_and_keep_the_policy():
  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  spec = core.SequenceSpec(13, 12)
  batch = demonstrations.off_policy_batch(task, np.random.default_rng(0), 8, spec)
  start = policy.evaluate_actions(decoder, params, batch)
  assert np.abs(np.asarray(start.values)).min() > 0  # A random head: what the fix is for.
  context = builder_lib.LearnerContext(
      model=decoder, sequence=spec, task=task, params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(1e-4, 1.0))
  for learner in (vtrace.make_vtrace_learner(context, vtrace.VTraceConfig()),
                  warp.WarpBuilder(warp.WarpConfig()).make_learner(context)):
    held = jax.device_get(learner.state.params)
    assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(held['value_head']))
    evaluation = policy.evaluate_actions(decoder, held, batch)
    np.testing.assert_array_equal(evaluation.values, 0.0)
    np.testing.assert_allclose(evaluation.logprobs, start.logprobs, rtol=1e-6, atol=1e-6)


def test_a_frozen_value_head_under_lora_is_left_as_it_is():
  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  adapted = dataclasses.replace(decoder, lora=models.LoraConfig(rank=2))
  params = lora.add_adapters(models.init_params(decoder, jax.random.PRNGKey(0)), adapted,
                             jax.random.PRNGKey(1))
  assert policy.with_zero_value_head(params) is params
