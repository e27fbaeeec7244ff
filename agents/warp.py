"""WARP (arXiv 2406.16768), its RL run: the KL regulariser anchored to an EMA of the policy.

WARP merges policies in weight space at three stages. This agent is the first: one RL
run whose reward is r(x, y) - beta * log(pi(y|x) / pi_ema(y|x)), the anchor pi_ema an
exponential moving average of the policy's own weights (theta_ema <- (1 - rate) *
theta_ema + rate * theta after every update) instead of the frozen reference, so the
regulariser relaxes as the policy improves. The other two stages work on the weights of
finished runs: M runs from one init are merged by SLERP of their task vectors, and the
init moves towards the merge by LITI, for I iterations (`chorus merge-runs`, with
learners/weight_averaging.py).

Models: the policy (and the frozen reference, for evaluation). Actors: one completion
per prompt from the policy, scored by the task (V-trace's rollout). Learner: the V-trace
loss (learners/vtrace.py) with the KL penalty folded into per-token rewards against the
anchor, which lives in the learner as an auxiliary tree. Batches: a replay queue.
"""
import dataclasses

from chorus.agents import builder as builder_lib
from chorus.agents import vtrace
from chorus.learners import learner as learner_lib
from chorus.learners import policy

ANCHOR = 'anchor'


@dataclasses.dataclass(frozen=True)
class WarpConfig(vtrace.VTraceConfig, tag='warp'):
  """V-trace with the KL to an EMA anchor (ALGORITHMS.md, WARP defaults).

  Attributes:
    kl_coef: beta of the per-token penalty -beta * (log mu - log pi_ema) (WARP: 0.1).
    anchor_update_rate: the EMA rate of the anchor after every update (WARP: 0.01); it
      starts at the run's initial weights.
  """
  kl_coef: float = 0.1
  anchor_update_rate: float = 0.01


@builder_lib.register
class WarpBuilder(vtrace.VTraceBuilder):
  """One WARP RL run: V-trace against an EMA anchor that follows the policy."""
  config_class = WarpConfig
  progress_metrics = (('kl_to_anchor', 'kl anchor'),)

  def make_learner(self, context):
    config = self.config
    return learner_lib.Learner(
        vtrace.vtrace_loss_fn(context.model, config, ANCHOR),
        params=policy.with_zero_value_head(context.params),
        optimizer=context.optimizer, aux={ANCHOR: context.params},
        update_aux=learner_lib.polyak_update(config.anchor_update_rate, ANCHOR),
        mesh=context.mesh)
