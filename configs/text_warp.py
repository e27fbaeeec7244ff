"""WARP's RL run on digit reversal: V-trace with the KL anchored to an EMA of the policy.

`chorus run --config text_warp` is one run; `chorus merge-runs --config text_warp` is
WARP: M runs from one init, merged by SLERP of their task vectors, the init moved towards
the merge by LITI (eta = 0.3), I times, with the KL-reward front of the plain runs and of
every iteration in the run directory. Runs are short (250 updates) so that M = 2 runs and
I = 2 iterations fit in about 15 minutes on 2 CPU cores.
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import EvalConfig
from chorus.launch.experiment import ExperimentConfig


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_warp',
      agent=agents.WarpConfig(kl_coef=0.1, anchor_update_rate=0.01),
      learner=dataclasses.replace(base.learner, max_steps=250),
      evaluation=EvalConfig(every_s=0.0))
