"""J-BOND on digit reversal: Best-of-2 of a moving anchor, judged by a learned reward model.

A setup node trains a reward model (warm-started on the demonstrations, mean-pooled: 0.96-0.98
held-out accuracy on swapped digits) on the task's noisy preference pairs; the inference
server serves the policy, the EMA anchor and the reward model; actors sample y from the
policy and two anchor samples, and score all three with the reward model.
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.preference import RewardModelConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_bond',
      # Measured with these before text_vtrace's defaults changed (issue #14).
      learner=dataclasses.replace(base.learner, learning_rate=2e-4, learning_rate_decay=False),
      replay=dataclasses.replace(base.replay, max_size=64),
      agent=agents.BondConfig(beta=0.5, kl_coef=0.5, anchor_update_rate=0.02,
                              reward_model=RewardModelConfig(kind='learned')))
