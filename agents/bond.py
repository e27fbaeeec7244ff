"""J-BOND (arXiv 2407.14622): distils Best-of-N sampling of a moving anchor into the policy.

Models: the policy, the EMA anchor (pushed by the learner beside the policy) and, with
`reward_model.kind=learned`, a reward model trained by a setup step. Actors: per prompt
y from the policy and `num_anchor_samples` from the anchor, every completion judged by
the task reward or the reward model; each trajectory records log pi_anchor(y) (scored by
the server), the better anchor sample and p-hat<=(y). Learner: the J-BOND loss
(learners/bond.py) with the anchor following the policy by EMA. Batches: the actors'
trajectories through a replay queue.
"""
from collections.abc import Sequence
import dataclasses

import numpy as np

from chorus import core
from chorus import schema
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.agents import learned_rewards
from chorus.inference_server.client import Completion
from chorus.learners import bond
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners.preference import RewardModelConfig

ANCHOR_MODEL = 'anchor'
EXTRAS = (
    schema.Field('anchor_logprobs', schema.PER_TOKEN, 'float32',
                 'log pi_anchor(y_t | prefix) of each completion token, scored when sampled'),
    schema.Field('best_anchor_tokens', schema.TOKENS, 'int32',
                 'the anchor sample with the highest reward (the Best-of-N target)'),
    schema.Field('anchor_win_rate', schema.SCALAR, 'float32',
                 'p-hat<=(y): share of the anchor samples whose reward is <= this one\'s'),
)


@dataclasses.dataclass(frozen=True)
class BondConfig(builder_lib.AgentConfig, tag='bond'):
  """J-BOND (ALGORITHMS.md defaults).

  Attributes:
    beta: weight of the backward (policy-gradient) term against the forward (maximum
      likelihood on the better anchor sample) term of the Jeffreys divergence.
    kl_coef: gamma, weight of the KL(pi || anchor) regulariser.
    anchor_update_rate: eta of the anchor EMA, anchor <- (1 - eta) anchor + eta theta,
      after every update; the anchor is pushed to the inference servers with the policy.
    num_anchor_samples: anchor samples per prompt drawn by the actors (J-BOND: 2).
    reward_model: who judges the samples: the task reward ('programmatic') or a reward
      model trained on the task's noisy preference pairs before RL ('learned').
  """
  beta: float = 0.5
  kl_coef: float = 0.5
  anchor_update_rate: float = 0.02
  num_anchor_samples: int = 2
  reward_model: RewardModelConfig = RewardModelConfig()

  def __post_init__(self):
    if self.num_anchor_samples < 1:
      raise ValueError(f'num_anchor_samples must be >= 1, got {self.num_anchor_samples}.')


class BestOfAnchorRollout:
  """y from the policy and `num_anchor_samples` from the moving anchor, per prompt.

  Each completion is judged by the task reward, or by the served reward model when
  `reward_model` is named. The sample records log pi_anchor(y), the better anchor
  sample (the forward, Best-of-N term learns from it) and p-hat<=(y), the share of
  anchor samples whose reward is <= r(y), whose zero gives r_J = -log 16.
  """

  def __init__(self, client, task: core.Task, settings, *, num_anchor_samples: int,
               reward_model: str | None):
    self._client, self._task, self._settings = client, task, settings
    self._num_anchor_samples = num_anchor_samples
    self._reward_model = reward_model

  def _rewards(self, prompts, prompt_tokens, completions: Sequence[Completion]) -> np.ndarray:
    if self._reward_model:
      return np.asarray(self._client.score_rewards(
          prompt_tokens, [c.tokens for c in completions], model=self._reward_model).rewards)
    return np.asarray([core.task_reward(self._task, p, c.tokens)
                       for p, c in zip(prompts, completions)])

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    sampled = rollouts.sample_policy(self._client, prompt_tokens, self._settings)
    num = self._num_anchor_samples
    anchor = self._client.generate(prompt_tokens, model=ANCHOR_MODEL,
                                   temperature=self._settings.temperature,
                                   max_new_tokens=self._settings.max_new_tokens,
                                   num_samples=num)
    policy_rewards = self._rewards(prompts, prompt_tokens, sampled.completions)
    anchor_rewards = self._rewards([p for p in prompts for _ in range(num)],
                                   [t for t in prompt_tokens for _ in range(num)],
                                   anchor.completions).reshape(len(prompts), num)
    anchor_logprobs = self._client.score_logprobs(
        prompt_tokens, [c.tokens for c in sampled.completions], model=ANCHOR_MODEL).logprobs
    samples = []
    for index, (prompt, completion) in enumerate(zip(prompts, sampled.completions)):
      best = anchor.completions[index * num + int(np.argmax(anchor_rewards[index]))]
      samples.append(rollouts.Sample(
          prompt, completion, sampled.param_version,
          self._task.reward_components(prompt, completion.tokens),
          extras=dict(
              anchor_logprobs=np.asarray(anchor_logprobs[index], np.float32),
              best_anchor_tokens=best.tokens,
              anchor_win_rate=float(np.mean(anchor_rewards[index] <= policy_rewards[index])))))
    return samples


def make_bond_learner(context: builder_lib.LearnerContext,
                      config: BondConfig) -> learner_lib.Learner:
  """Batches carry log pi_anchor(y) and the better anchor sample, as the actors scored them."""
  model = context.model

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux  # The anchor's log-probs arrive with the batch.
    sampled = policy.evaluate_actions(model, params, batch)
    best_anchor = policy.evaluate_extra_tokens(model, params, batch, 'best_anchor_tokens')
    win_rate = batch.extras['anchor_win_rate']
    loss, metrics = bond.jbond_loss(
        sampled.logprobs, batch.extras['anchor_logprobs'], best_anchor.logprobs,
        batch.completion_mask, batch.extras['best_anchor_mask'],
        bond.jbond_binary_reward(win_rate), beta=config.beta, kl_coef=config.kl_coef)
    metrics['win_rate_vs_anchor'] = win_rate.mean()
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             aux={ANCHOR_MODEL: context.params},
                             update_aux=learner_lib.polyak_update(config.anchor_update_rate,
                                                                  ANCHOR_MODEL),
                             published_aux=(ANCHOR_MODEL,), mesh=context.mesh)


@builder_lib.register
class BondBuilder(builder_lib.AgentBuilder):
  """Best-of-N distillation against an EMA anchor served beside the policy."""
  config_class = BondConfig
  progress_metrics = (('kl_to_anchor', 'kl anchor'), ('win_rate_vs_anchor', 'win vs anchor'))

  @property
  def _judge(self) -> learned_rewards.LearnedModel:
    return learned_rewards.LearnedModel(self.config.reward_model, learned_rewards.REWARD)

  def trajectory_extras(self):
    return EXTRAS

  def served_models(self, model):
    return (builder_lib.ServedModelSpec(ANCHOR_MODEL, published=True),
            *self._judge.served_models(model))

  def scored_models(self):
    return (ANCHOR_MODEL,)

  def setup_steps(self, replay_dataset):
    return self._judge.setup_steps()

  def check(self, task):
    self._judge.check(task)

  def make_rollout(self, client, task, actor_config):
    return BestOfAnchorRollout(client, task, actor_config,
                               num_anchor_samples=self.config.num_anchor_samples,
                               reward_model=self._judge.served_name)

  def make_learner(self, context):
    return make_bond_learner(context, self.config)
