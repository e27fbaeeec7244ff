"""`chorus datasets`: every subcommand on datasets written here, checked against what was written."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus.actors import reverse_digits
from chorus.datasets import EpisodeLogger
from chorus.datasets import read_trajectories
from chorus.launch import cli

_TASK = reverse_digits.ReverseDigitsTask()
_TOKENIZER = models.CharTokenizer()
_EPISODES_PER_ACTOR = {0: 8, 1: 7}


def _trajectories(actor_id: int, count: int) -> list[core.Trajectory]:
  """Digit-task episodes: sloppy answers, some cut short without EOS, assorted versions."""
  rng = np.random.default_rng(actor_id)
  trajectories = []
  for episode_id in range(count):
    prompt = _TASK.train_prompt(rng)
    completion = _TASK.demonstration(prompt, rng)
    terminated = bool(rng.integers(3))
    if not terminated:
      completion = completion[:int(rng.integers(1, len(completion)))]
    components = _TASK.reward_components(prompt, completion)
    trajectories.append(core.Trajectory(
        prompt_tokens=np.asarray(_TASK.encode_prompt(prompt), np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=-rng.exponential(size=len(completion)).astype(np.float32),
        reward=sum(components.values()), terminated=terminated,
        param_version=int(rng.integers(0, 6)), temperature=0.7, prompt_id=prompt.prompt_id,
        actor_id=actor_id, episode_id=episode_id, task=_TASK.name, seed=11,
        reward_components=components))
  return trajectories


@pytest.fixture(name='run_rlds', scope='module')
def fixture_run_rlds(tmp_path_factory):
  """A run's rlds/ folder of two actors with files of 3 episodes; returns (folder, episodes)."""
  rlds = tmp_path_factory.mktemp('run') / 'rlds'
  written = []
  for actor_id, count in _EPISODES_PER_ACTOR.items():
    trajectories = _trajectories(actor_id, count)
    with EpisodeLogger(rlds / f'actor_{actor_id:03d}', max_episodes_per_file=3) as logger:
      for trajectory in trajectories:
        logger.write(trajectory)
    written.extend(trajectories)
  return rlds, written


def _datasets(capsys, *args) -> tuple[int, str, str]:
  capsys.readouterr()  # Drops what earlier steps printed.
  status = cli.main(['datasets', *map(str, args)])
  out, err = capsys.readouterr()
  return status, out, err


def _assert_same(got: list[core.Trajectory], expected: list[core.Trajectory]):
  assert len(got) == len(expected)
  for got_one, expected_one in zip(got, expected):
    for field in dataclasses.fields(core.Trajectory):
      got_value, expected_value = getattr(got_one, field.name), getattr(expected_one, field.name)
      if isinstance(expected_value, np.ndarray):
        np.testing.assert_array_equal(got_value, expected_value, err_msg=field.name)
      else:
        assert got_value == expected_value, field.name


def test_inspect_shows_schema_counts_and_the_first_episodes_as_text(run_rlds, capsys):
  rlds, written = run_rlds
  status, out, _ = _datasets(capsys, 'inspect', rlds, '-n', 2)
  assert status == 0
  for name in ('action', 'behaviour_logprob', 'is_terminal', 'prompt_tokens', 'task', 'seed',
               'reward_component_names', 'reward_component_values'):
    assert f'  {name} ' in out
  for actor_id, count in _EPISODES_PER_ACTOR.items():
    assert f'{rlds / f"actor_{actor_id:03d}"} ' in out
    assert any(line.split()[-1] == str(count) and f'actor_{actor_id:03d}' in line
               for line in out.splitlines())
  total_line = next(line for line in out.splitlines() if line.strip().startswith('total'))
  assert total_line.split() == ['total', str(len(written))]
  assert re.findall(r'^Episode (\d+):', out, re.M) == ['0', '1']
  for trajectory in written[:2]:
    assert f"'{_TOKENIZER.decode(trajectory.prompt_tokens)}'" in out
    assert f"'{_TOKENIZER.decode(trajectory.completion_tokens)}'" in out
    assert f'param_version {trajectory.param_version}; length ' \
           f'{len(trajectory.completion_tokens)}' in out


def test_stats_match_numpy_on_the_written_episodes_and_plot_a_png(run_rlds, tmp_path, capsys):
  rlds, written = run_rlds
  plot = tmp_path / 'stats.png'
  status, out, _ = _datasets(capsys, 'stats', rlds, '--plot', plot)
  assert status == 0
  versions = np.array([t.param_version for t in written])
  expected = {
      'reward': [t.reward for t in written],
      'completion_length': [len(t.completion_tokens) for t in written],
      'policy_lag': versions.max() - versions,
      'reward/positional_accuracy': [t.reward_components['positional_accuracy']
                                     for t in written],
  }
  rows = {cells[0]: cells[1:] for cells in map(str.split, out.splitlines())
          if len(cells) == 8}  # Name and the 7 columns.
  assert set(rows) == set(expected)
  for name, values in expected.items():
    numbers = (np.mean(values), np.std(values), np.min(values), np.percentile(values, 50),
               np.percentile(values, 90), np.max(values))
    assert rows[name] == [str(len(values))] + [f'{x:.6g}' for x in numbers], name
  assert 'policy_lag = (newest param_version in these episodes) - param_version' in out
  assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert plot.stat().st_size > 5000


def test_export_writes_every_field_of_every_episode(run_rlds, tmp_path, capsys):
  rlds, written = run_rlds
  output = tmp_path / 'episodes.jsonl'
  status, out, _ = _datasets(capsys, 'export', rlds, '--output', output)
  assert status == 0
  assert f'Wrote {len(written)} episodes' in out
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(records) == len(written)
  field_names = {field.name for field in dataclasses.fields(core.Trajectory)} - {'extras'}
  for record, trajectory in zip(records, written):
    assert set(record) == field_names | {'prompt_text', 'completion_text'}
    assert record['prompt_tokens'] == trajectory.prompt_tokens.tolist()
    assert record['completion_tokens'] == trajectory.completion_tokens.tolist()
    np.testing.assert_array_equal(np.float32(record['behaviour_logprobs']),
                                  trajectory.behaviour_logprobs)
    for name in field_names - {'prompt_tokens', 'completion_tokens', 'behaviour_logprobs'}:
      assert record[name] == getattr(trajectory, name), name
    assert record['prompt_text'] == f'rev {trajectory.prompt_id}>'
    assert record['completion_text'] == _TOKENIZER.decode(trajectory.completion_tokens)


# Each bound equals some episodes' value, and --terminated-only drops a low reward.
@pytest.mark.parametrize('flags, keep', [
    (['--min-reward', '1'], lambda t: t.reward >= 1),
    (['--max-reward', '0.6', '--terminated-only'], lambda t: t.reward <= 0.6 and t.terminated),
    (['--min-version', '3'], lambda t: t.param_version >= 3),
])
def test_filter_writes_exactly_the_passing_episodes_as_a_new_dataset(
    run_rlds, tmp_path, capsys, flags, keep):
  rlds, written = run_rlds
  expected = [t for t in written if keep(t)]
  assert 0 < len(expected) < len(written)
  assert any(t.reward <= 0.6 and not t.terminated for t in written)
  status, out, _ = _datasets(capsys, 'filter', rlds, '--output', tmp_path / 'kept', *flags)
  assert status == 0
  assert f'Kept {len(expected)} of {len(written)} episodes' in out
  _assert_same(read_trajectories(tmp_path / 'kept'), expected)


def test_filter_and_merge_refuse_to_append_to_an_existing_dataset(run_rlds, capsys):
  rlds, _ = run_rlds
  output = rlds / 'actor_001'
  status, _, err = _datasets(capsys, 'merge', rlds / 'actor_000', '--output', output)
  assert status == 1
  assert f'{output} already exists and is not an empty directory' in err
  assert len(read_trajectories(output)) == _EPISODES_PER_ACTOR[1]


def test_merge_puts_every_episode_in_one_directory(run_rlds, tmp_path, capsys):
  rlds, written = run_rlds
  output = tmp_path / 'merged'
  status, out, _ = _datasets(capsys, 'merge', rlds / 'actor_000', rlds / 'actor_001',
                             '--output', output)
  assert status == 0
  assert f'Merged {len(written)} episodes of 2 directories' in out
  assert {'dataset_info.json', 'features.json'} <= set(os.listdir(output))
  assert os.path.getsize(output / 'episodes.journal') == 0  # Closed: all in closed files.
  _assert_same(read_trajectories(output), written)


# Each damages a copy of the run's rlds/ folder; returns the damaged file and the
# episodes per actor that --skip-corrupt still reads.
def _garbage_appended(rlds):
  path = rlds / 'actor_001' / 'chorus_episodes-train.tfrecord-00001'
  with open(path, 'ab') as f:
    f.write(b'\x00garbage')  # Shorter than a record header, which TF itself ignores.
  return path, _EPISODES_PER_ACTOR  # The file's 3 episodes are intact.


def _cut_mid_record(rlds):
  path = rlds / 'actor_000' / 'chorus_episodes-train.tfrecord-00001'
  path.write_bytes(path.read_bytes()[:-20])  # Into the file's third and last episode.
  return path, {0: _EPISODES_PER_ACTOR[0] - 1, 1: _EPISODES_PER_ACTOR[1]}


def _broken_json(rlds):
  path = rlds / 'actor_000' / 'dataset_info.json'
  path.write_text(path.read_text()[:40])
  return path, {0: 0, 1: _EPISODES_PER_ACTOR[1]}  # The directory's files are not found.


@pytest.mark.parametrize('damage', [_garbage_appended, _cut_mid_record, _broken_json])
def test_damaged_data_stops_with_the_file_named_or_is_skipped_with_skip_corrupt(
    run_rlds, tmp_path, capsys, damage):
  rlds = tmp_path / 'rlds'
  shutil.copytree(run_rlds[0], rlds)
  path, readable_per_actor = damage(rlds)
  status, out, err = _datasets(capsys, 'export', rlds, '--output', tmp_path / 'all.jsonl')
  assert status == 1
  assert str(path) in err and '--skip-corrupt' in err
  assert not out

  status, out, err = _datasets(capsys, 'export', rlds, '--output', tmp_path / 'all.jsonl',
                               '--skip-corrupt')
  assert status == 0
  assert f'skipped damaged data: {path} ' in err
  records = [json.loads(line) for line in (tmp_path / 'all.jsonl').read_text().splitlines()]
  assert {a: sum(r['actor_id'] == a for r in records) for a in (0, 1)} == readable_per_actor
  assert f'Wrote {len(records)} episodes' in out


@pytest.mark.parametrize('command', [['inspect'], ['stats'], ['filter', '--output', 'OUT'],
                                     ['merge', '--output', 'OUT']])
def test_every_subcommand_names_a_damaged_file_and_reads_around_it(
    run_rlds, tmp_path, capsys, command):
  rlds = tmp_path / 'rlds'
  shutil.copytree(run_rlds[0], rlds)
  path, _ = _garbage_appended(rlds)
  name, *options = [str(tmp_path / 'out') if arg == 'OUT' else arg for arg in command]
  status, _, err = _datasets(capsys, name, rlds, *options)
  assert status == 1
  assert f'{path} is damaged after 3 of the 3 episodes' in err and '--skip-corrupt' in err
  status, _, err = _datasets(capsys, name, rlds, *options, '--skip-corrupt')
  assert status == 0
  assert f'skipped damaged data: {path} ' in err


def test_the_chorus_command_exits_1_naming_a_damaged_file(run_rlds, tmp_path):
  rlds = tmp_path / 'rlds'
  shutil.copytree(run_rlds[0], rlds)
  path, _ = _cut_mid_record(rlds)
  damaged = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'datasets', 'stats', str(rlds)],
      capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
      check=False)
  assert damaged.returncode == 1, damaged.stderr
  assert f'chorus datasets stats: {path} is damaged after 2 of the 3 episodes' in damaged.stderr
  assert 'Add --skip-corrupt' in damaged.stderr
