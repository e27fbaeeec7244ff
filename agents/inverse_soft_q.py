"""Inverse soft-Q: imitation from demonstrations as TD-regularised maximum likelihood
(IQ-Learn reformulated, arXiv 2409.01369).

Models: the policy (and the reference every experiment serves). Actors: none. Learner:
the loss of learners/soft_q.py (`inverse_soft_q_loss`) with Q = the policy's raw
logits; at td_coef = 0 it is exactly maximum likelihood. Batches: an RLDS dataset read
directly (no replay): `replay_dataset`, or else the task's demonstrations, which a setup
step records first into the run's demonstrations/ folder.
"""
import dataclasses
import logging

from chorus import core
from chorus import datasets
from chorus.actors import demonstrations
from chorus.agents import builder as builder_lib
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import soft_q

DEMONSTRATIONS_DIR = 'demonstrations'


@dataclasses.dataclass(frozen=True)
class InverseSoftQConfig(builder_lib.AgentConfig, tag='inverse_soft_q'):
  """Inverse soft-Q: TD-regularised maximum likelihood on demonstrations.

  Attributes:
    td_coef: lambda, weight of the squared implied reward (Q(s, a) - gamma V(s')); 0 is
      exactly maximum likelihood.
    discount: gamma per token (1 for text).
    num_demonstrations: demonstrations of the task recorded by the setup step when no
      `replay_dataset` is given.
  """
  td_coef: float = 0.1
  discount: float = 1.0
  num_demonstrations: int = 4096


def make_inverse_soft_q_learner(context: builder_lib.LearnerContext,
                                config: InverseSoftQConfig) -> learner_lib.Learner:
  """Imitation of demonstrations by inverse soft-Q; Q = the policy's raw logits."""
  model = context.model

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    evaluation = policy.evaluate_actions(model, params, batch, with_log_normalizers=True)
    q_taken = evaluation.logprobs + evaluation.log_normalizers[:, :-1]
    loss, metrics = soft_q.inverse_soft_q_loss(
        q_taken, evaluation.log_normalizers, batch.completion_mask, batch.terminated,
        td_coef=config.td_coef, discount=config.discount)
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             mesh=context.mesh)


def record_demonstrations(context: builder_lib.SetupContext, count: int):
  """Records `count` of the task's demonstrations as an RLDS dataset in demonstrations/."""
  source = demonstrations.demonstrations(context.task, context.seed, seed_offset=13)
  directory = context.path(f'{DEMONSTRATIONS_DIR}/demonstrator_000')
  with datasets.EpisodeLogger(directory,
                              max_episodes_per_file=context.rlds_episodes_per_file) as logger:
    for _ in range(count):
      if context.should_stop():
        return
      logger.write(next(source))
  logging.info('Recorded %d demonstrations in %s', count, context.path(DEMONSTRATIONS_DIR))


@builder_lib.register
class InverseSoftQBuilder(builder_lib.AgentBuilder):
  """Offline imitation: demonstrations straight from RLDS, no actors, no replay."""
  config_class = InverseSoftQConfig
  progress_metrics = (('nll', 'nll'), ('td_error', 'td error'))

  def setup_steps(self, replay_dataset):
    if replay_dataset:
      return ()
    count = self.config.num_demonstrations
    return (builder_lib.SetupStep(
        'demonstrations', lambda context: record_demonstrations(context, count)),)

  def data(self, replay_dataset):
    return builder_lib.Data(builder_lib.DataSource.DATASET, replay_dataset or DEMONSTRATIONS_DIR)

  def make_rollout(self, client, task, actor_config):
    raise ValueError('inverse_soft_q runs no actors: it learns from a recorded dataset.')

  def make_learner(self, context):
    return make_inverse_soft_q_learner(context, self.config)
