"""Nash-MD on digit reversal: the policy against the geometric mixture of itself and the reference.

Actors sample y from the policy and y' from the mixture (two KV caches on the inference
server) and judge the pair with P(y > y') = sigmoid((r(y) - r(y')) / 0.1) from the task
reward. `--set agent.preference_model.kind=learned` trains a pairwise preference model on
the task's noisy pairs first and asks the served model instead; the tiny model reaches
only about 0.56 held-out accuracy in its minute of CPU training, too little to improve
the policy (benchmarks/RESULTS.md), so the programmatic preference is the default.
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_nash_md',
      # Measured with these before text_vtrace's defaults changed (issue #14).
      learner=dataclasses.replace(base.learner, learning_rate=2e-4, learning_rate_decay=False),
      replay=dataclasses.replace(base.replay, max_size=64),
      agent=agents.NashMDConfig(kl_coef=0.008, mixture_coef=0.125))
