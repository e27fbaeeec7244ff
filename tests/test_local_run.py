"""The whole loop as real processes: warm start, Reverb, inference server, actors, learner."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chorus import core
from chorus.actors import reverse_digits
from chorus.datasets import read_trajectories
from chorus.metrics import read_metrics

pytestmark = pytest.mark.slow

_SMALL_RUN = [
    '--num-actors', '2', '--max-learner-steps', '12', '--seed', '3',
    '--set', 'warm_start.steps=30', '--set', 'learner.batch_size=8',
    '--set', 'learner.log_every=4', '--set', 'learner.checkpoint_every=6',
    '--set', 'replay.max_size=32', '--set', 'inference.max_batch_size=8',
    '--set', 'task.num_eval_prompts=16', '--set', 'rlds_episodes_per_file=10',
    '--set', 'evaluation.every_s=0', '--set', 'inference.cpu_cores=1',
]


def _processes_mentioning(text: str) -> list[int]:
  pids = []
  for pid in os.listdir('/proc'):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as file:
        if text.encode() in file.read():
          pids.append(int(pid))
    except OSError:
      continue
  return pids


def _waited_children_cpu_seconds() -> float:
  """cutime + cstime of this process from /proc: CPU of every descendant it has reaped."""
  with open('/proc/self/stat') as file:
    fields = file.read().rsplit(')', 1)[1].split()
  return (int(fields[13]) + int(fields[14])) / os.sysconf('SC_CLK_TCK')


@pytest.fixture(scope='module', name='run')
def fixture_run(tmp_path_factory) -> tuple[str, float]:
  """The run's directory, and the CPU-seconds of its whole process tree as /proc reports."""
  run_dir = str(tmp_path_factory.mktemp('run') / 'text_vtrace')
  before = _waited_children_cpu_seconds()
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir] + _SMALL_RUN,
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return run_dir, _waited_children_cpu_seconds() - before


@pytest.fixture(scope='module', name='run_dir')
def fixture_run_dir(run) -> str:
  return run[0]


def test_run_directory_has_summary_curves_checkpoints_tensorboard_and_rlds(run_dir):
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  for key in ('config', 'learner_steps', 'episodes', 'initial_eval_reward', 'final_eval_reward',
              'tokens_per_second', 'mean_policy_lag', 'wall_seconds'):
    assert key in summary, key
  assert summary['learner_steps'] == 12
  assert summary['episodes'] >= 12 * 8
  assert 0.0 <= summary['initial_eval_reward'] <= 1.0
  assert summary['final_eval']['param_versions'] == [12]
  assert summary['initial_eval']['param_versions'] == [0]
  assert summary['config']['learner']['batch_size'] == 8
  assert os.path.getsize(os.path.join(run_dir, 'curves.png')) > 1000
  assert max(map(int, os.listdir(os.path.join(run_dir, 'checkpoints', 'learner')))) == 12
  assert os.listdir(os.path.join(run_dir, 'checkpoints', 'warm_start')) == ['0']
  assert any(name.startswith('events') for name in os.listdir(os.path.join(run_dir, 'tensorboard')))
  learner_records = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert [r['step'] for r in learner_records] == [4, 8, 12]


def test_the_server_runs_on_the_one_core_it_was_given(run_dir):
  records = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='inference_server_0')
  started = [r for r in records if r['kind'] == 'inference_server']
  assert [r['cpu_cores'] for r in started] == [sorted(os.sched_getaffinity(0))[:1]]


def test_cost_accounting_sums_to_what_proc_reports_for_the_process_tree(run):
  run_dir, tree_cpu_seconds = run
  with open(os.path.join(run_dir, 'summary.json')) as file:
    cost = json.load(file)['cost']
  nodes = cost['cpu_seconds_by_node']
  assert {'launcher', 'warm_start', 'replay_0', 'inference_server_0', 'actors_0',
          'learner'} <= set(nodes)
  # After their last samples: the launcher's summary and its exit (about 1.5 CPU-s).
  assert sum(nodes.values()) == pytest.approx(tree_cpu_seconds, rel=0.1)
  assert 0 < cost['rl_cpu_seconds'] < sum(nodes.values())
  assert cost['cpu_ms_per_episode'] > 0
  assert 0 < cost['learner_duty_cycle'] < 1


def test_rlds_episodes_read_back_exactly_what_each_actor_sent(run_dir):
  finals = {r['node']: r for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
            if r.get('kind') == 'actor_final'}
  assert sorted(finals) == ['actor_0', 'actor_1']
  task = reverse_digits.ReverseDigitsTask()
  for actor_id in (0, 1):
    episodes = read_trajectories(os.path.join(run_dir, 'rlds', f'actor_{actor_id:03d}'))
    sent = finals[f'actor_{actor_id}']
    assert len(episodes) == sent['episodes'] > 0
    digest = core.TrajectoryDigest()
    for episode in episodes:
      digest.update(episode)
    assert digest.hexdigest() == sent['episode_digest']
    assert [e.episode_id for e in episodes] == list(range(len(episodes)))
    for episode in episodes:
      assert episode.actor_id == actor_id
      assert np.all(episode.behaviour_logprobs <= 0)
      assert 0 <= episode.param_version <= 12
      prompt = core.Prompt(episode.prompt_id, f'rev {episode.prompt_id}>',
                            episode.prompt_id[::-1])
      assert list(episode.prompt_tokens) == task.encode_prompt(prompt)
      assert episode.reward == pytest.approx(task.reward(prompt, episode.completion_tokens))


def test_no_node_process_outlives_the_run(run_dir):
  assert _processes_mentioning(run_dir) == []
