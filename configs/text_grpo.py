"""GRPO on digit reversal: 8 samples per prompt, rewards standardised within each group.

The same warm start, actors, server, replay queue and learner budget as `text_vtrace`
(600 updates of 32 completions), so the two compare directly; GRPO has no value head:
each completion's advantage is its reward against its 7 siblings', computed by the actor.
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig


def get_config() -> ExperimentConfig:
  return dataclasses.replace(text_vtrace.get_config(), name='text_grpo',
                             agent=agents.GRPOConfig())
