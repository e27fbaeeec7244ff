"""WARM on the task's noisy pairs: M reward models from one init, alone, ensembled, averaged.

Runs only the learned reward model's setup step of an experiment (text_bond by default)
with `agent.reward_model.num_models=M` and prints the held-out pairwise accuracy it logs
for each member, for their prediction ensemble (mean score, M forward passes) and for
their weight average (the served model, one forward pass), overall and correct-vs-swap.

With `--shift-run RUN_DIR` (repeatable) it also measures them under the distribution shift of RL: on
pairs of the final policy of that finished run (say a text_bond run), sampled
`--shift-samples` times per held-out prompt at temperature 1 and labelled by the task
reward (every pair of distinct rewards among a prompt's distinct finished samples).

Usage (from the repository root):

  .venv/bin/python benchmarks/warm_reward_models.py --run-dir /tmp/warm [--models 3]
      [--config text_bond] [--set FIELD=VALUE ...] [--shift-run RUN_DIR]
"""
import argparse
import itertools
import os
import resource
import time

import jax

from chorus import configs
from chorus import models
from chorus.agents import learned_rewards
from chorus.launch import evaluate
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.learners import preference
from chorus.metrics import read_metrics
from chorus.models.checkpoints import Checkpointer


def policy_pairs(run_dir: str, task, samples: int) -> tuple[list, int]:
  """(pairs, learner step): `(prompt, a, b, a_better)` from a run's final policy."""
  config = evaluate.load_config(run_dir)
  params, step = evaluate.load_policy(run_dir, config)
  prompts, pairs = task.eval_prompts(), []
  per_call = max(1, config.inference.max_batch_size // samples)
  with evaluate.served_policy(config, params, step) as client:
    for start in range(0, len(prompts), per_call):
      chunk = prompts[start:start + per_call]
      result = client.generate([task.encode_prompt(p) for p in chunk], num_samples=samples,
                               seed=start)
      for index, prompt in enumerate(chunk):
        drawn = result.completions[index * samples:(index + 1) * samples]
        texts = sorted({task.tokenizer.decode(c.tokens) for c in drawn if c.terminated})
        for first, second in itertools.combinations(texts, 2):
          margin = task.text_reward(prompt, first) - task.text_reward(prompt, second)
          if margin:
            pairs.append((prompt, first, second, margin > 0))
  return pairs, step


def shift_accuracy(config, run_dir: str, models_count: int, pairs) -> list[tuple[str, float]]:
  """Accuracy of each member, their ensemble and the served average on `pairs`."""
  judge = learned_rewards.LearnedModel(config.agent.reward_model, learned_rewards.REWARD)
  model = judge.architecture(config.model.base_decoder_config())
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  restore = lambda path: Checkpointer(os.path.join(run_dir, path)).restore(shapes)
  members = ([restore(os.path.join(learned_rewards.MEMBERS_DIR, str(m)))
              for m in range(models_count)] if models_count > 1 else [])
  served = restore(learned_rewards.CHECKPOINT_DIR)
  batch = preference.make_preference_batch(config.make_task(), pairs,
                                           config.sequence.prompt_len,
                                           config.sequence.completion_len)
  accuracy = lambda params_list: preference.ordered_accuracy(preference.reward_margins(
      model, params_list, batch, config.agent.reward_model.pooling), batch)
  rows = [(f'member {m}', accuracy([params])) for m, params in enumerate(members)]
  if members:
    rows.append((f'prediction ensemble of {models_count}', accuracy(members)))
  return rows + [('weight average (served)', accuracy([served]))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--run-dir', required=True)
  parser.add_argument('--config', default='text_bond')
  parser.add_argument('--models', type=int, default=3)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--shift-run', action='append', default=[],
                      help='a finished run directory whose final policy draws shift pairs '
                      '(repeatable)')
  parser.add_argument('--shift-samples', type=int, default=8)
  args = parser.parse_args()
  config = experiment.apply_overrides(
      configs.get_config(args.config),
      [f'agent.reward_model.num_models={args.models}', *args.set])
  os.makedirs(args.run_dir, exist_ok=True)
  load, start = os.getloadavg(), time.monotonic()
  nodes.setup(config, args.run_dir, lambda: False, step='reward_model')
  usage = resource.getrusage(resource.RUSAGE_SELF)
  print(f'wall {time.monotonic() - start:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s, '
        f'load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, '
        f'after {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
  print(f'reward model: {config.agent.reward_model}')
  print('| model | overall | vs swap | vs drop | vs extra | vs substitute | vs random |')
  print('|:---|---:|---:|---:|---:|---:|---:|')
  for record in read_metrics(os.path.join(args.run_dir, 'metrics.jsonl'), node='reward_model'):
    if record.get('kind') != 'reward_model_eval':
      continue
    member = record.get('member')
    name = ('weight average (served)' if member is None else
            f'prediction ensemble of {args.models}' if member == 'ensemble' else
            f'member {member}')
    values = [record['accuracy']] + [record.get(f'accuracy_correct_vs_{kind}', float('nan'))
                                     for kind in ('swap', 'drop', 'extra', 'substitute',
                                                  'random')]
    print(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in values) + ' |')
  for shift_run in args.shift_run:
    pairs, step = policy_pairs(shift_run, config.make_task(), args.shift_samples)
    print(f'\nOn {len(pairs)} pairs of {shift_run} (learner step {step}), '
          f'{args.shift_samples} samples per held-out prompt:')
    print('| model | accuracy |\n|:---|---:|')
    for name, value in shift_accuracy(config, args.run_dir, args.models, pairs):
      print(f'| {name} | {value:.3f} |')


if __name__ == '__main__':
  main()
