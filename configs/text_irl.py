"""Inverse soft-Q (TD-regularised maximum likelihood) on a demonstrations dataset.

No actors and no warm start: the policy starts from random weights and learns from an
RLDS dataset of the sloppy annotator's demonstrations, recorded by a setup node, or from
`--replay-dataset PATH` (for example a run's rlds/ folder filtered with
`chorus datasets filter --min-reward`).
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.loop import LearnerConfig
from chorus.learners.supervised import WarmStartConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_irl',
      agent=agents.InverseSoftQConfig(td_coef=0.1),
      warm_start=WarmStartConfig(steps=0),
      learner=LearnerConfig(batch_size=64, learning_rate=3e-3, max_steps=1000, log_every=10,
                            publish_every=10))
