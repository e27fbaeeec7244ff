"""The `chorus` command: fast to answer, and one clear line for what the user got wrong."""
import json
import subprocess
import sys
import time

import pytest

from chorus import configs
from chorus.launch import cli


def _chorus(*args, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'chorus.launch.cli', *args], capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_help_and_configs_answer_without_loading_tensorflow_or_jax():
  code = ('import sys; from chorus.launch import cli; cli.main(["configs"]); '
          'print(sorted(m for m in ("jax", "tensorflow", "reverb") if m in sys.modules))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert 'text_vtrace' in result.stdout
  assert result.stdout.strip().endswith('[]')
  began = time.monotonic()
  result = _chorus('--help')
  assert result.returncode == 0 and 'datasets' in result.stdout
  assert time.monotonic() - began < 5  # About 0.1 s alone; generous on a loaded machine.


@pytest.mark.parametrize('args, words', [
    (('run', '--config', 'nope'), ['Unknown config', 'text_vtrace']),
    (('configs', 'nope'), ['Unknown config']),
    (('run', '--prompts', 'missing.jsonl', '--reward', 'x:y'), ['does not exist']),
    (('run', '--prompts', 'missing.jsonl'), ['go together']),
    (('run', '--task', 'a:B', '--prompts', 'p.jsonl', '--reward', 'x:y'), ['not both']),
])
def test_usage_errors_are_one_line_on_stderr_with_status_2(args, words):
  result = _chorus(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('chorus ')
  assert 'Traceback' not in result.stderr
  for word in words:
    assert word in lines[0]


def test_a_reward_that_is_not_there_is_named(tmp_path, capsys):
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt": "rev 12>"}\n{"prompt": "rev 34>"}\n')
  rewards = tmp_path / 'rewards.py'
  rewards.write_text('def score(prompt, completion, row):\n  return 1.0\n')
  assert cli.main(['run', '--prompts', str(prompts), '--reward', f'{rewards}:nope']) == 2
  assert "has no attribute 'nope'" in capsys.readouterr().err


def test_a_task_reference_that_is_a_function_is_named(tmp_path, capsys):
  module = tmp_path / 'mine.py'
  module.write_text('def score(prompt, completion, row):\n  return 1.0\n')
  assert cli.main(['run', '--task', f'{module}:score']) == 2
  assert 'not a class' in capsys.readouterr().err


def test_a_directory_that_holds_a_run_is_only_resumed_and_with_the_runs_own_config(
    tmp_path, capsys):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  assert cli.main(['run', '--resume', str(run_dir)]) == 2
  assert 'holds no run to resume' in capsys.readouterr().err
  from chorus.launch import experiment  # pylint: disable=g-import-not-at-top  (imports JAX)
  (run_dir / 'config.json').write_text(
      json.dumps(experiment.to_dict(configs.get_config('text_vtrace'))))
  assert cli.main(['run', '--run-dir', str(run_dir)]) == 2
  assert f'already holds a run; continue it with `chorus run --resume {run_dir}`' in (
      capsys.readouterr().err)
  assert cli.main(['run', '--resume', str(run_dir), '--seed', '3', '--set', 'seed=4']) == 2
  assert 'leave out --seed, --set' in capsys.readouterr().err
  # The new budget goes through the run's config and its checks.
  assert cli.main(['run', '--resume', str(run_dir), '--max-learner-steps', '0']) == 2
  assert 'max_steps' in capsys.readouterr().err
  assert not (run_dir / 'logs').exists()  # Nothing was started.


def test_closing_table_shows_the_runs_key_numbers():
  from chorus.launch import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  summary = dict(learner_steps=500, episodes=8092, skipped_episodes=3,
                 initial_eval=dict(reward=0.447, greedy_reward=0.577, win_rate=0.5),
                 final_eval=dict(reward=0.599, greedy_reward=0.7, win_rate=0.655),
                 tokens_per_second=1364.2, mean_policy_lag=1.78, wall_seconds=177.0,
                 rl_seconds=33.0)
  table = report.summary_table(summary)
  assert 'held-out reward         0.447 -> 0.599' in table
  assert '8092 (3 skipped' in table and '177 s (RL 33 s)' in table


def test_progress_line_has_an_eta_once_the_learner_moves(tmp_path):
  from chorus.launch import report  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'metrics.jsonl'
  progress = report.Progress(str(path), max_steps=100)
  path.write_text('{"kind": "learner", "node": "learner", "step": 10, "loss": 0.1}\n')
  assert 'ETA' not in progress.line(now=0.0)
  with open(path, 'a') as file:
    file.write('{"kind": "learner", "node": "learner", "step": 20, "loss": 0.1}\n')
  assert 'step 20/100 (ETA 1m20s)' in progress.line(now=10.0)


def test_terminal_progress_rewrites_one_line_and_ends_it_before_other_output(capsys):
  terminal = cli._TerminalProgress()  # pylint: disable=protected-access
  terminal.progress('step 1/10')
  terminal.progress('step 2/10')
  terminal.print('final eval')
  captured = capsys.readouterr()
  assert captured.err == '\r\033[Kstep 1/10\r\033[Kstep 2/10\n'
  assert captured.out == 'final eval\n'


def test_isolate_network_goes_with_the_local_launcher_only(capsys):
  assert cli.main(['run', '--isolate-network', '--launcher', 'ray']) == 2
  assert capsys.readouterr().err.strip() == (
      'chorus run: --isolate-network keeps every node on this machine; it goes with '
      '--launcher local only.')


def test_isolate_network_without_unshare_names_the_missing_command(capsys, monkeypatch):
  monkeypatch.setenv('PATH', '/nonexistent')
  assert cli.main(['run', '--isolate-network']) == 2
  assert 'needs the `unshare` command (util-linux)' in capsys.readouterr().err
