"""Users' own tasks: prompt files with a reward function, Task classes, failing rewards."""
import json
import logging
import math
import os

import numpy as np
import pytest

from chorus import core
from chorus.actors import prompt_file
from chorus.actors import tasks
from chorus.actors import user_task
from chorus.actors.actor import Actor
from chorus.actors.actor import ActorConfig
from chorus.actors.demonstrations import demonstrations
from chorus.actors.evaluation import evaluate
from chorus.actors.rollouts import Sample
from chorus.inference_server.client import Completion

_REWARDS = '''
import math
import os

def score(prompt, completion, row):
  if row.get('id') == 'boom':
    raise RuntimeError('no score for this one')
  if row.get('id') == 'nan':
    return math.nan
  return {'match': float(completion == row.get('answer')), 'bonus': 0.5}
'''


def _write_prompts(tmp_path, rows, name='prompts.jsonl'):
  path = tmp_path / name
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  (tmp_path / 'rewards.py').write_text(_REWARDS)
  return prompt_file.PromptFileConfig(path=str(path), reward=f'{tmp_path}/rewards.py:score')


def _rows(count, with_completion=True):
  rows = [{'prompt': f'rev {i:03d}>', 'answer': f'{i:03d}'[::-1]} for i in range(count)]
  for row in rows[::2] if with_completion else []:
    row['completion'] = row['answer']
  return rows


def test_prompt_file_task_splits_held_out_rows_and_scores_with_the_users_function(tmp_path):
  config = _write_prompts(tmp_path, _rows(40))
  task = tasks.make_task(config)
  assert isinstance(task, core.Task)
  assert task.name == 'prompts'
  held_out = {p.prompt_id for p in task.eval_prompts()}
  assert len(held_out) == 4  # eval_fraction 0.1 of 40.
  assert held_out == {p.prompt_id for p in tasks.make_task(config).eval_prompts()}
  rng = np.random.default_rng(0)
  trained = {task.train_prompt(rng).prompt_id for _ in range(400)}
  assert not trained & held_out and len(trained) == 36
  prompt = task.prompt_from_id('2')
  demonstration = task.demonstration(prompt, rng)
  assert task.tokenizer.decode(demonstration) == '200'
  assert task.reward_components(prompt, demonstration) == {'match': 1.0, 'bonus': 0.5}
  assert task.demonstration(task.prompt_from_id('1'), rng) is None  # RL-only row.
  assert task.has_demonstrations


def test_prompt_file_reads_csv_and_the_eval_share_is_a_config_field(tmp_path):
  path = tmp_path / 'prompts.csv'
  path.write_text('prompt,answer\n' + ''.join(f'rev {i}>,{i}\n' for i in range(10)))
  (tmp_path / 'rewards.py').write_text(_REWARDS)
  task = tasks.make_task(prompt_file.PromptFileConfig(
      path=str(path), reward=f'{tmp_path}/rewards.py:score', eval_fraction=0.3))
  assert len(task.eval_prompts()) == 3
  assert not task.has_demonstrations  # No completion column: the warm start is skipped.
  assert task.prompt_from_id('4').text == 'rev 4>'


@pytest.mark.parametrize('rows, words', [
    ([{'text': 'x'}], 'no "prompt"'),
    ([{'prompt': 'ABC'}], 'cannot be encoded'),
    ([{'prompt': 'a', 'id': 1}, {'prompt': 'b', 'id': 1}], 'appears twice'),
])
def test_bad_prompt_files_are_errors_naming_the_row(tmp_path, rows, words):
  with pytest.raises(ValueError, match=words):
    tasks.make_task(_write_prompts(tmp_path, rows))


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = prompt_file.PromptFileConfig(path='p.jsonl', reward='r.py:score')
  assert config.path == str(tmp_path / 'p.jsonl')
  assert config.reward == f'{tmp_path}/r.py:score'
  assert prompt_file.PromptFileConfig(reward='my_rewards:score').reward == 'my_rewards:score'
  assert user_task.UserTaskConfig(cls='t.py:T').cls == f'{tmp_path}/t.py:T'


def test_rewards_that_raise_or_are_nan_are_logged_with_the_prompt_and_come_back_nan(
    tmp_path, caplog):
  rows = [{'prompt': 'a', 'id': 'boom'}, {'prompt': 'b', 'id': 'nan'}, {'prompt': 'c', 'id': 'ok'}]
  task = tasks.make_task(_write_prompts(tmp_path, rows))
  tokens = [task.tokenizer.eos_id]
  with caplog.at_level(logging.WARNING):
    raised = task.reward_components(task.prompt_from_id('boom'), tokens)
    nan = task.reward_components(task.prompt_from_id('nan'), tokens)
  assert math.isnan(sum(raised.values())) and math.isnan(sum(nan.values()))
  assert "'boom'" in caplog.text and 'RuntimeError: no score for this one' in caplog.text
  assert "'nan'" in caplog.text and 'not finite' in caplog.text
  assert task.failed_rewards == 2
  assert task.reward_components(task.prompt_from_id('ok'), tokens) == {'match': 0.0, 'bonus': 0.5}


class _Generate:
  """InferenceClient.generate's shape: one completion (EOS only) per prompt."""

  def __call__(self, prompt_tokens, num_samples=1, **unused):
    completion = Completion(tokens=np.asarray([2], np.int32),
                            logprobs=np.zeros(1, np.float32), terminated=True)
    return type('Result', (), dict(completions=[completion] * len(prompt_tokens) * num_samples,
                                   param_version=0))()


def test_actor_drops_episodes_whose_reward_failed_and_counts_them(tmp_path):
  rows = [{'prompt': 'a', 'id': 'boom'}, {'prompt': 'b', 'id': 'nan'}, {'prompt': 'c', 'id': 'ok'}]
  task = tasks.make_task(_write_prompts(tmp_path, rows))
  prompts = [task.prompt_from_id(i) for i in ('boom', 'nan', 'ok')]
  generate = _Generate()

  def rollout(unused_prompts):
    completion = generate([[1]]).completions[0]
    return [Sample(p, completion, 0, task.reward_components(p, completion.tokens))
            for p in prompts]

  logged, stored = [], []
  actor = Actor(0, ActorConfig(), task, rollout=rollout,
                write_replay=lambda trajectories, _: stored.extend(trajectories),
                log_episode=logged.append, metrics=None, seed=0)
  actor.run_once()
  assert [t.prompt_id for t in logged] == ['ok'] and [t.prompt_id for t in stored] == ['ok']
  assert actor.skipped_episodes == 2 and actor.episodes == 1


def test_evaluation_leaves_failed_rewards_out_of_the_mean_and_counts_them(tmp_path):
  rows = [{'prompt': 'a', 'id': 'boom'}, {'prompt': 'b', 'id': 'nan'}, {'prompt': 'c', 'id': 'ok'}]
  task = tasks.make_task(_write_prompts(tmp_path, rows))
  result = evaluate(_Generate(), task, temperature=1.0, batch_size=8,
                    prompts=[task.prompt_from_id(i) for i in ('boom', 'nan', 'ok')])
  assert result['reward'] == 0.5 and result['skipped_rewards'] == 2


def test_a_task_without_demonstrations_says_so_instead_of_looping(tmp_path):
  class NoDemos:
    name = 'none'

    def train_prompt(self, rng):
      return core.Prompt('x', 'x')

    def demonstration(self, prompt, rng):
      return None

  with pytest.raises(ValueError, match='no demonstration'):
    next(demonstrations(NoDemos(), seed=0))


def test_user_task_class_is_imported_by_path_and_checked(tmp_path):
  module = tmp_path / 'mine.py'
  module.write_text('class Half:\n  name = "half"\n')
  with pytest.raises(ValueError, match=r"lacks \['tokenizer'"):
    tasks.make_task(user_task.UserTaskConfig(cls=f'{module}:Half'))
  examples = __file__.rsplit('/tests/', 1)[0] + '/examples'
  task = tasks.make_task(user_task.UserTaskConfig(cls=f'{examples}/repeat_task.py:RepeatTask'))
  assert isinstance(task, core.Task) and task.name == 'repeat_letter'
  prompt = task.eval_prompts()[0]
  rng = np.random.default_rng(0)
  assert core.task_reward(task, prompt, task.demonstration(prompt, rng)) == 1.0


def test_warm_start_node_skips_training_when_no_row_has_a_completion(tmp_path):
  from chorus.launch import experiment  # pylint: disable=g-import-not-at-top  (JAX)
  from chorus.launch import nodes  # pylint: disable=g-import-not-at-top
  from chorus.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  config = experiment.ExperimentConfig(task=_write_prompts(tmp_path, _rows(10, False)))
  config.check()
  run_dir = str(tmp_path / 'run')
  nodes.warm_start(config, run_dir, lambda: False)  # Would never end if it looked for demos.
  assert os.listdir(os.path.join(run_dir, 'checkpoints', 'warm_start')) == ['0']
  assert not [r for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
              if r.get('kind') == 'warm_start']


def test_parquet_needs_pyarrow_and_other_types_are_named(tmp_path):
  (tmp_path / 'p.parquet').write_bytes(b'PAR1')
  (tmp_path / 'p.txt').write_text('prompt\n')
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with pytest.raises(ValueError, match='needs pyarrow'):
      prompt_file.read_rows(str(tmp_path / 'p.parquet'))
  with pytest.raises(ValueError, match="unknown prompt file type '.txt'"):
    prompt_file.read_rows(str(tmp_path / 'p.txt'))
