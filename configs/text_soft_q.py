"""Soft Q-learning on digit reversal from a uniform replay table, after the warm start.

Off-policy: the learner samples old and new trajectories uniformly, and the same config
trains offline from a recorded dataset with `--replay-dataset PATH` (no actors).
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.replay.config import ReplayConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_soft_q',
      # Measured with these before text_vtrace's defaults changed (issue #14).
      learner=dataclasses.replace(base.learner, learning_rate=2e-4, learning_rate_decay=False),
      replay=ReplayConfig(kind='uniform', max_size=4096, min_size_to_sample=256,
                          samples_per_insert=2.0),
      # A faster target than ALGORITHMS.md's 0.001, which suits much longer runs.
      agent=agents.SoftQConfig(reward_scale=10.0, multi_step=True, target_update_rate=0.01))
