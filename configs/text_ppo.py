"""PPO with GAE on digit reversal: token-level value head, 2 epochs over each batch.

The same warm start, actors, server, replay queue and learner budget as `text_vtrace`
(600 updates of 32 completions, KL coefficient 0.02 folded into the rewards), so the two
compare directly; each update takes 2 passes over its whole batch. 4 passes of 2
minibatches learned faster on seed 0 but collapsed on seed 1 (benchmarks/RESULTS.md).
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig


def get_config() -> ExperimentConfig:
  return dataclasses.replace(text_vtrace.get_config(), name='text_ppo',
                             agent=agents.PPOConfig())
