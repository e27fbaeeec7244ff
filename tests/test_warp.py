"""WARP's RL run (agents/warp.py) and the front of `chorus merge-runs` (launch/merging.py)."""
import jax
import numpy as np
import pytest

from chorus import agents
from chorus import core
from chorus import models
from chorus.actors import demonstrations
from chorus.actors import reverse_digits
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.launch import merging

_SPEC = core.SequenceSpec(16, 12)


def test_the_anchor_starts_at_the_init_and_follows_the_policy_by_ema():
  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  reference = models.init_params(decoder, jax.random.PRNGKey(1))
  config = agents.WarpConfig(anchor_update_rate=0.01)
  learner = agents.make_builder(config).make_learner(agents.LearnerContext(
      model=decoder, sequence=_SPEC, task=task, params=params, reference_params=reference,
      optimizer=learner_lib.make_optimizer(1e-2, 1.0)))
  batch = demonstrations.off_policy_batch(task, np.random.default_rng(0), 8, _SPEC)
  metrics = learner.update(batch)
  # At step 0 the anchor is the init, not the (different) reference: the KL metric is
  # the sampled log-ratio to the init.
  init_logprobs = np.asarray(policy.evaluate_actions(decoder, params, batch).logprobs)
  mask = np.asarray(batch.completion_mask)
  expected_kl = np.mean(np.sum((np.asarray(batch.behaviour_logprobs) - init_logprobs) * mask,
                               axis=1))
  assert metrics['kl_to_anchor'] == pytest.approx(expected_kl, rel=1e-4)
  updated = learner.state.params
  anchor = learner.state.aux['anchor']
  for p0, p1, a in zip(*map(jax.tree_util.tree_leaves, (params, updated, anchor))):
    np.testing.assert_allclose(a, 0.99 * p0 + 0.01 * p1, rtol=1e-5, atol=1e-7)
  assert 'reference' not in learner.state.aux
  assert learner.published_params().keys() == {'policy'}


def test_warp_defaults_are_the_papers():
  config = agents.WarpConfig()
  assert (config.kl_coef, config.anchor_update_rate) == (0.1, 0.01)
  assert merging.MergeSettings().liti_rate == 0.3
  with pytest.raises(ValueError, match='liti_rate must be in'):
    merging.MergeSettings(liti_rate=0.0)


def test_gain_at_equal_kl_compares_with_the_baselines_upper_envelope():
  baseline = [dict(kl=0.0, reward=0.5), dict(kl=2.0, reward=0.9), dict(kl=4.0, reward=0.8),
              dict(kl=1.0, reward=0.6)]
  # Envelope: 0.5 at 0, 0.6 at 1, 0.9 at 2, 0.9 at 4 (a worse point does not lower it).
  points = [dict(kl=1.5, reward=0.8), dict(kl=3.0, reward=0.95), dict(kl=9.0, reward=1.0)]
  assert merging.gain_at_equal_kl(baseline, points) == pytest.approx(
      np.mean([0.8 - 0.75, 0.95 - 0.9]))
  assert merging.gain_at_equal_kl(baseline, [dict(kl=5.0, reward=1.0)]) is None
