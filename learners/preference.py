"""Training learned reward and preference models on a task's noisy preference pairs.

Losses are pure functions of score arrays; `train_reward_model` and
`train_preference_model` step them with Adam over `preference_batches`, the way
`supervised.warm_start` does for demonstrations. The models are `models.Decoder`s read
through `models.reward_models`, so the inference server serves them like any other.
"""
from collections.abc import Iterator
import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from chorus import models
from chorus.learners import optimization
from chorus.models import reward_models

_KINDS = ('programmatic', 'learned')
# The reward model's own architecture by default: 4 blocks of width 64 over the
# character vocabulary (the policy's 2 blocks of width 32, warm-started, with last-token
# reads, stayed near chance on swapped digit pairs; not tried with mean pooling).
DEFAULT_MODEL = models.DecoderConfig(
    vocab_size=models.CharTokenizer().vocab_size, num_layers=4, embed_dim=64, num_heads=4,
    num_kv_heads=2, head_dim=16, mlp_dim=256, max_seq_len=64)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Where an experiment's rewards (or preferences) come from.

  Attributes:
    kind: 'programmatic' uses the task's own reward function (and, for preferences, a
      comparison of those rewards); no model is trained and these other fields are
      ignored. 'learned' trains a reward model (Bradley-Terry) or a pairwise preference
      model on the task's noisy preference pairs before RL starts, and the inference
      server serves it.
    model: the learned model's architecture, its own (not the policy's); its
      vocab_size is replaced by the policy's (the same token ids), and a preference
      model's max_seq_len must hold the prompt and both completions.
    pooling: how the score is read from the model's value head
      (`models.reward_models.POOLINGS`): 'last' after the whole completion, as
      sequence-classification reward models do; 'mean' averaged over the completion's
      tokens, which learns a reward made of per-token terms several times sooner (on
      digit reversal, after the warm start: 0.97 held-out accuracy on swapped digits
      after 500 steps, against 0.58 with 'last', 0.80 after 1,500;
      benchmarks/RESULTS.md, "Reward models").
    warm_start_steps: steps of next-token training on the task's demonstrations (Adam
      3e-3, 64 per step) before the preference training, as InstructGPT starts its
      reward model from the supervised model; 0 starts from random weights. WARM's
      members all start from this one warm start.
    steps: Adam steps of the preference training (of each model, with `num_models` > 1).
    batch_size: preference pairs per step.
    learning_rate: Adam learning rate of the preference training.
    num_pairs: 0 draws fresh labelled pairs every step (an unlimited annotator budget);
      N > 0 draws one fixed dataset of N pairs and cycles through it in reshuffled
      epochs, as with a finite human-labelled dataset.
    num_models: M. WARM (arXiv 2401.12187) for M > 1: M models are fine-tuned from one
      initialisation, each on its own stream of pairs (its own order of the fixed
      dataset with `num_pairs`), and the average of their weights is served.
    seed: seeds the pairs and the models' (shared) initial parameters.
  """
  kind: str = 'programmatic'
  model: models.DecoderConfig = DEFAULT_MODEL
  pooling: str = 'mean'
  warm_start_steps: int = 400
  steps: int = 500
  batch_size: int = 32
  learning_rate: float = 1e-3
  num_pairs: int = 0
  num_models: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f'RewardModelConfig.kind must be one of {_KINDS}; got {self.kind!r}.')
    reward_models.check_pooling(self.pooling)
    for name in ('warm_start_steps', 'steps', 'num_pairs', 'seed'):
      if getattr(self, name) < 0:
        raise ValueError(f'RewardModelConfig.{name} must be >= 0; got {getattr(self, name)}.')
    for name in ('batch_size', 'num_models'):
      if getattr(self, name) < 1:
        raise ValueError(f'RewardModelConfig.{name} must be >= 1; got {getattr(self, name)}.')
    if self.num_pairs and self.num_pairs < self.batch_size:
      raise ValueError(f'num_pairs={self.num_pairs} is smaller than batch_size='
                       f'{self.batch_size}; use num_pairs=0 for fresh pairs or raise it.')


class PreferenceBatch(NamedTuple):
  """Labelled pairs: the annotator preferred `chosen` over `rejected`.

  Attributes:
    prompt_tokens: [B, P] int32, left padded.
    prompt_mask: [B, P] bool.
    chosen_tokens: [B, T] int32, right padded, ending with EOS.
    chosen_mask: [B, T] bool.
    rejected_tokens: [B, T] int32, right padded, ending with EOS.
    rejected_mask: [B, T] bool.
    chosen_rewards: [B] float32, the task's programmatic reward of `chosen` (for
      measuring models against the truth; training never reads it).
    rejected_rewards: [B] float32, likewise for `rejected`.
  """
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  chosen_tokens: np.ndarray
  chosen_mask: np.ndarray
  rejected_tokens: np.ndarray
  rejected_mask: np.ndarray
  chosen_rewards: np.ndarray
  rejected_rewards: np.ndarray


def bradley_terry_loss(chosen_scores: jax.Array,
                       rejected_scores: jax.Array) -> tuple[jax.Array, dict]:
  """Reward-model loss -log sigmoid(r_chosen - r_rejected), averaged.

  Args:
    chosen_scores: [B] scores of the preferred completions.
    rejected_scores: [B] scores of the others.

  Returns:
    (loss, metrics): loss = mean softplus(-(chosen - rejected)); metrics 'loss',
    'accuracy' (share with chosen > rejected) and 'margin' (mean chosen - rejected).
  """
  chex.assert_rank([chosen_scores, rejected_scores], 1)
  chex.assert_equal_shape([chosen_scores, rejected_scores])
  margin = chosen_scores - rejected_scores
  loss = jnp.mean(jax.nn.softplus(-margin))
  return loss, {'loss': loss, 'accuracy': jnp.mean(margin > 0), 'margin': jnp.mean(margin)}


def pairwise_preference_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """Binary cross-entropy of a preference model's logits of P(first > second).

  Args:
    logits: [B] logits of P(first preferred).
    labels: [B] 1 where the first was preferred, 0 where the second was (soft labels
      in [0, 1] work too).

  Returns:
    (loss, metrics): loss = mean(labels * softplus(-logits) + (1 - labels) *
    softplus(logits)); metrics 'loss' and 'accuracy' (sign of the logit agrees with
    the label).
  """
  chex.assert_rank([logits, labels], 1)
  chex.assert_equal_shape([logits, labels])
  labels = labels.astype(logits.dtype)
  loss = jnp.mean(labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(logits))
  accuracy = jnp.mean((logits > 0) == (labels > 0.5))
  return loss, {'loss': loss, 'accuracy': accuracy}


def make_preference_batch(task, pairs, prompt_len: int, completion_len: int) -> PreferenceBatch:
  """Pads `(prompt, completion_a, completion_b, a_preferred)` tuples into a batch."""
  prompts, chosen, rejected = [], [], []
  for prompt, first, second, first_preferred in pairs:
    prompts.append(prompt)
    chosen.append(first if first_preferred else second)
    rejected.append(second if first_preferred else first)
  prompt_tokens, prompt_mask = models.left_pad_prompts(
      [task.encode_prompt(p) for p in prompts], prompt_len)
  chosen_tokens, chosen_mask = models.right_pad_completions(
      [task.encode_completion(c) for c in chosen], completion_len)
  rejected_tokens, rejected_mask = models.right_pad_completions(
      [task.encode_completion(r) for r in rejected], completion_len)
  rewards = lambda texts: np.array([task.text_reward(p, t) for p, t in zip(prompts, texts)],
                                   np.float32)
  return PreferenceBatch(prompt_tokens, prompt_mask, chosen_tokens, chosen_mask,
                         rejected_tokens, rejected_mask, rewards(chosen), rewards(rejected))


def preference_batches(task, rng: np.random.Generator, batch_size: int, prompt_len: int,
                       completion_len: int, num_pairs: int = 0,
                       order_rng: np.random.Generator | None = None
                       ) -> Iterator[PreferenceBatch]:
  """Endless batches of the task's noisy preference pairs (`task.preference_pair`).

  Args:
    task: a task with `preference_pair`, `encode_prompt`, `encode_completion`,
      `text_reward` (e.g. `ReverseDigitsTask`).
    rng: the only source of randomness; the stream is a function of it.
    batch_size: pairs per batch (B).
    prompt_len: P, at least `task.max_prompt_tokens`.
    completion_len: T, at least `task.max_preference_completion_tokens`.
    num_pairs: 0 for fresh pairs in every batch; N > 0 for a fixed set of N pairs,
      cycled in reshuffled epochs.
    order_rng: shuffles the fixed set's epochs (default: `rng`), so that models trained
      on one set (WARM's) can see it in different orders.

  Yields:
    PreferenceBatch with prompts [B, P] and completions [B, T].
  """
  if not num_pairs:
    while True:
      pairs = [task.preference_pair(rng) for _ in range(batch_size)]
      yield make_preference_batch(task, pairs, prompt_len, completion_len)
  if num_pairs < batch_size:
    raise ValueError(f'num_pairs={num_pairs} < batch_size={batch_size}; a fixed dataset '
                     'must hold at least one batch.')
  dataset = make_preference_batch(task, [task.preference_pair(rng) for _ in range(num_pairs)],
                                  prompt_len, completion_len)
  order_rng = rng if order_rng is None else order_rng
  while True:
    order = order_rng.permutation(num_pairs)
    for start in range(0, num_pairs - batch_size + 1, batch_size):
      rows = order[start:start + batch_size]
      yield PreferenceBatch(*(field[rows] for field in dataset))


def _reward_model_loss(decoder_config, pooling, params, batch: PreferenceBatch):
  # Both sides in one forward pass.
  scores = reward_models.reward_scores(
      decoder_config, params,
      jnp.concatenate([batch.prompt_tokens, batch.prompt_tokens]),
      jnp.concatenate([batch.prompt_mask, batch.prompt_mask]),
      jnp.concatenate([batch.chosen_tokens, batch.rejected_tokens]),
      jnp.concatenate([batch.chosen_mask, batch.rejected_mask]), pooling)
  chosen, rejected = jnp.split(scores, 2)
  return bradley_terry_loss(chosen, rejected)


def _preference_model_loss(decoder_config, pooling, params, batch: PreferenceBatch):
  # The logit is antisymmetric, so (chosen, rejected) with label 1 is the same example as
  # (rejected, chosen) with label 0: no need to shuffle the order.
  logits = reward_models.preference_logits(
      decoder_config, params, batch.prompt_tokens, batch.prompt_mask, batch.chosen_tokens,
      batch.chosen_mask, batch.rejected_tokens, batch.rejected_mask, pooling)
  return pairwise_preference_loss(logits, jnp.ones_like(logits))


def _train(loss_fn, decoder_config, config, pairs_iterator, params):
  if params is None:
    params = models.init_params(decoder_config, jax.random.PRNGKey(config.seed))
  optimizer = optax.adam(config.learning_rate)
  update = jax.jit(functools.partial(optimization.optimizer_step,
                                     functools.partial(loss_fn, decoder_config, config.pooling),
                                     optimizer))
  opt_state = optimizer.init(params)
  history = []
  for step in range(config.steps):
    batch = next(pairs_iterator)
    params, opt_state, metrics = update(params, opt_state, batch)
    history.append({'step': step, **{k: float(v) for k, v in jax.device_get(metrics).items()}})
  return params, history


def train_reward_model(decoder_config: models.DecoderConfig, config: RewardModelConfig,
                       pairs_iterator: Iterator[PreferenceBatch],
                       params=None) -> tuple[object, list[dict]]:
  """Fits a reward model with `bradley_terry_loss`; score = `reward_models.reward_scores`.

  Args:
    decoder_config: the reward model's size; max_seq_len >= P + T.
    config: pooling, steps, batch size (of the iterator's batches) and learning rate.
    pairs_iterator: yields PreferenceBatch (see `preference_batches`).
    params: start from these; None starts from `init_params` seeded by `config.seed`.

  Returns:
    (params, history): the trained parameters and per-step metrics
    ('step', 'loss', 'accuracy' against the noisy labels, 'margin', 'grad_norm').
  """
  return _train(_reward_model_loss, decoder_config, config, pairs_iterator, params)


def train_preference_model(decoder_config: models.DecoderConfig, config: RewardModelConfig,
                           pairs_iterator: Iterator[PreferenceBatch],
                           params=None) -> tuple[object, list[dict]]:
  """Fits a pairwise preference model with `pairwise_preference_loss`.

  Args:
    decoder_config: the preference model's size; max_seq_len >= P + 2T.
    config: pooling, steps, batch size (of the iterator's batches) and learning rate.
    pairs_iterator: yields PreferenceBatch (see `preference_batches`).
    params: start from these; None starts from `init_params` seeded by `config.seed`.

  Returns:
    (params, history): the trained parameters and per-step metrics ('step', 'loss',
    'accuracy' against the noisy labels, 'grad_norm').
  """
  return _train(_preference_model_loss, decoder_config, config, pairs_iterator, params)


def ordered_accuracy(margins: np.ndarray, batch: PreferenceBatch) -> float:
  """Share of the batch's pairs, ties in task reward left out, that `margins` [B] order like
  the task's reward: margin > 0 where the chosen completion has the higher reward."""
  truth = np.asarray(batch.chosen_rewards) - np.asarray(batch.rejected_rewards)
  decided = truth != 0
  if not decided.any():
    return float('nan')
  return float(np.mean((np.asarray(margins) > 0)[decided] == (truth > 0)[decided]))


def reward_margins(decoder_config: models.DecoderConfig, members, batch: PreferenceBatch,
                   pooling: str) -> np.ndarray:
  """[B] r(x, chosen) - r(x, rejected), r the mean score of the reward models `members`
  (a list of parameter trees; one for a single model, several for a prediction ensemble)
  read with `pooling`."""
  def scores(tokens, mask):
    return np.mean([np.asarray(reward_models.reward_scores(
        decoder_config, params, batch.prompt_tokens, batch.prompt_mask, tokens, mask,
        pooling)) for params in members], axis=0)
  return (scores(batch.chosen_tokens, batch.chosen_mask)
          - scores(batch.rejected_tokens, batch.rejected_mask))


def preference_margins(decoder_config: models.DecoderConfig, members, batch: PreferenceBatch,
                       pooling: str) -> np.ndarray:
  """[B] logits of P(chosen > rejected), the mean of the preference models `members`'
  (read with `pooling`)."""
  return np.mean([np.asarray(reward_models.preference_logits(
      decoder_config, params, batch.prompt_tokens, batch.prompt_mask, batch.chosen_tokens,
      batch.chosen_mask, batch.rejected_tokens, batch.rejected_mask, pooling))
                  for params in members], axis=0)


def held_out_accuracy(margins_fn, task, rng: np.random.Generator, prompt_len: int,
                      completion_len: int, num_prompts: int = 256) -> dict[str, float]:
  """How often a model orders held-out pairs like the task's reward does.

  Args:
    margins_fn: PreferenceBatch -> [B] margins (`reward_margins` or `preference_margins`
      with the model's parameters bound).
    task: the task (its `eval_prompts()` are never in the training pairs).
    rng: draws the candidates.
    prompt_len: P.
    completion_len: T >= task.max_preference_completion_tokens.
    num_prompts: how many held-out prompts to use.

  Returns:
    'accuracy' on `preference_pair`s of held-out prompts (ties in task reward skipped),
    and 'accuracy_correct_vs_<kind>' for the correct answer against each of
    `task.corruptions`.
  """
  prompts = task.eval_prompts()[:num_prompts]
  pairs = [task.preference_pair(rng, prompt) for prompt in prompts]
  batch = make_preference_batch(task, pairs, prompt_len, completion_len)
  metrics = {'accuracy': ordered_accuracy(margins_fn(batch), batch)}
  # The correct answer against each corruption; 'swap' is the sloppy annotator's (and so a
  # warm-started policy's) mistake, the one RL needs the model to see.
  correct = [task.corrupted_answer(prompt, 'correct', rng) for prompt in prompts]
  for kind in task.corruptions:
    corrupted = [task.corrupted_answer(prompt, kind, rng) for prompt in prompts]
    batch = make_preference_batch(task, [(p, c, x, True) for p, c, x in
                                         zip(prompts, correct, corrupted)],
                                  prompt_len, completion_len)
    metrics[f'accuracy_correct_vs_{kind}'] = ordered_accuracy(margins_fn(batch), batch)
  return metrics


def reward_model_accuracy(decoder_config: models.DecoderConfig, params, task,
                          rng: np.random.Generator, prompt_len: int, completion_len: int,
                          pooling: str, num_prompts: int = 256) -> dict[str, float]:
  """`held_out_accuracy` of one reward model."""
  return held_out_accuracy(
      lambda batch: reward_margins(decoder_config, [params], batch, pooling), task, rng,
      prompt_len, completion_len, num_prompts)


def preference_model_accuracy(decoder_config: models.DecoderConfig, params, task,
                              rng: np.random.Generator, prompt_len: int, completion_len: int,
                              pooling: str, num_prompts: int = 256
                              ) -> dict[str, float]:
  """`held_out_accuracy` of one pairwise preference model (the sign of its logit)."""
  return held_out_accuracy(
      lambda batch: preference_margins(decoder_config, [params], batch, pooling), task, rng,
      prompt_len, completion_len, num_prompts)
