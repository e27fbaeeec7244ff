"""Nash-MD on digit reversal against a learned pairwise preference model.

A setup node trains the preference model on the task's noisy preference pairs; actors
sample y from the policy and y' from the geometric mixture of policy and reference (two
KV caches on the inference server), and ask the served preference model for P(y > y').
"""
import dataclasses

from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.nash_md_learner import NashMDConfig
from chorus.learners.preference import RewardModelConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_nash_md', algorithm='nash_md',
      nash_md=NashMDConfig(kl_coef=0.008, mixture_coef=0.125),
      reward_model=RewardModelConfig(kind='learned'))
