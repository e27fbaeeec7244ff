"""Each algorithm's config as a short run of real processes: the wiring, not the learning.

(Whether each one learns is measured by full runs; see benchmarks/RESULTS.md.)
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chorus.actors import music
from chorus.actors import reverse_digits
from chorus.datasets import read_trajectories
from chorus.learners import grpo
from chorus.metrics import read_metrics
from chorus.models import codec

pytestmark = pytest.mark.slow

_STEPS = 8
_SMALL = [
    '--num-actors', '2', '--max-learner-steps', str(_STEPS), '--seed', '1',
    '--set', 'warm_start.steps=30', '--set', 'learner.batch_size=8',
    '--set', 'learner.log_every=4', '--set', 'learner.checkpoint_every=4',
    '--set', 'inference.max_batch_size=8', '--set', 'task.num_eval_prompts=16',
    '--set', 'evaluation.every_s=0', '--set', 'replay.min_size_to_sample=8',
]
_SHORT_REWARD_MODEL = ('--set', 'agent.reward_model.warm_start_steps=5',
                       '--set', 'agent.reward_model.steps=20',
                       '--set', 'agent.reward_model.batch_size=16')
_LEARNED_PREFERENCE_MODEL = ('--set', 'agent.preference_model.kind=learned',
                             '--set', 'agent.preference_model.warm_start_steps=5',
                             '--set', 'agent.preference_model.steps=20',
                             '--set', 'agent.preference_model.batch_size=16')


def _run(name: str, run_dir: str, *extra: str) -> dict:
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--config', name, '--run-dir', run_dir,
       *_SMALL, *extra], capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    return json.load(file)


def _served_versions(run_dir: str) -> dict[str, int]:
  versions = {}
  for record in read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='inference_server_0'):
    if record.get('kind') == 'inference':
      versions[record['model']] = record['param_version']
  return versions


@pytest.mark.parametrize('name, extra', [
    ('text_soft_q', ()), ('text_bond', _SHORT_REWARD_MODEL), ('text_nash_md', ()),
    ('text_nash_md', _LEARNED_PREFERENCE_MODEL),  # The served preference model.
])
def test_online_algorithm_runs_and_logs_its_fields(name, extra, tmp_path):
  run_dir = str(tmp_path / name)
  summary = _run(name, run_dir, *extra)
  assert summary['learner_steps'] == _STEPS
  assert summary['final_eval']['param_versions'] == [_STEPS]
  assert 0 <= summary['final_eval']['win_rate'] <= 1
  assert os.path.getsize(os.path.join(run_dir, 'curves.png')) > 1000
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  assert len(episodes) >= _STEPS * 8
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert [r['step'] for r in learner] == [4, 8]
  if name == 'text_soft_q':
    assert all(not e.extras for e in episodes)
    return
  # BOND and Nash-MD record per-token log-probs under another served model, a second
  # completion and a win probability, all from the inference server.
  logprobs, tokens, win = (('anchor_logprobs', 'best_anchor_tokens', 'anchor_win_rate')
                           if name == 'text_bond' else
                           ('reference_logprobs', 'opponent_tokens', 'preference'))
  for episode in episodes:
    assert sorted(episode.extras) == sorted([logprobs, tokens, win])
    assert episode.extras[logprobs].shape == episode.completion_tokens.shape
    assert np.all(episode.extras[logprobs] <= 0)
    assert len(episode.extras[tokens]) >= 1
    assert 0 <= episode.extras[win] <= 1
  if name == 'text_bond':
    # Two anchor samples: p-hat<= is 0, 1/2 or 1; the anchor follows the learner; the
    # samples were judged by the learned reward model warm-started and trained in the
    # setup node.
    assert {e.extras[win] for e in episodes} <= {0.0, 0.5, 1.0}
    assert _served_versions(run_dir)['anchor'] == _STEPS
    reward_model = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='reward_model')
    assert any(r.get('kind') == 'reward_model_eval' for r in reward_model)
    assert any(r.get('kind') == 'reward_model_warm_start' for r in reward_model)
  else:
    # Nash-MD: the opponent came from the policy/reference mixture, judged by the task
    # reward (the default, no model trained) or by the learned preference model.
    learned = 'reward_model.log' in os.listdir(os.path.join(run_dir, 'logs'))
    assert learned == (extra == _LEARNED_PREFERENCE_MODEL)
    assert ('preference' in _served_versions(run_dir)) == learned


def test_inverse_soft_q_learns_from_a_recorded_demonstrations_dataset(tmp_path):
  run_dir = str(tmp_path / 'text_irl')
  summary = _run('text_irl', run_dir, '--set', 'agent.num_demonstrations=64')
  demonstrations = read_trajectories(os.path.join(run_dir, 'demonstrations'))
  assert len(demonstrations) == 64
  assert all(d.model_name == 'demonstrator' for d in demonstrations)
  assert summary['learner_steps'] == _STEPS
  assert summary['episodes'] == 0  # No actors.
  assert not os.path.exists(os.path.join(run_dir, 'rlds'))
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert learner[-1]['nll'] < learner[0]['nll']


_SMALL_MUSIC = [
    '--num-actors', '2', '--max-learner-steps', str(_STEPS), '--seed', '1',
    '--set', 'warm_start.steps=20', '--set', 'learner.batch_size=8',
    '--set', 'learner.log_every=4', '--set', 'learner.checkpoint_every=4',
    '--set', 'inference.max_batch_size=8', '--set', 'task.eval_samples_per_caption=2',
    '--set', 'evaluation.every_s=0',
]


@pytest.mark.parametrize('name', ['music_vtrace', 'music_cfg_distill'])
def test_music_run_writes_rlds_episodes_and_wav_samples_that_read_back(name, tmp_path):
  run_dir = str(tmp_path / name)
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--config', name, '--run-dir', run_dir,
       *_SMALL_MUSIC], capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == _STEPS
  for evaluation in (summary['initial_eval'], summary['final_eval']):
    assert set(evaluation['reward_components']) == {'caption_adherence', 'quality'}
    assert 0 <= evaluation['diversity'] <= 2
  teacher = summary['initial_eval']['cfg_teacher']
  assert teacher['tokens_per_second'] > 0 and 0 <= teacher['diversity'] <= 2

  task = music.MusicTask(music.MusicTaskConfig(eval_samples_per_caption=2))
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  assert len(episodes) >= _STEPS * 8
  for episode in episodes[:50]:
    assert episode.task == 'music_captions' and episode.terminated
    assert list(episode.prompt_tokens) == task.encode_prompt(task.prompt_from_id(episode.prompt_id))
    if name == 'music_cfg_distill':
      assert set(episode.reward_components) == {'diversity'}
  samples = os.path.join(run_dir, 'samples')
  wavs = sorted(f for f in os.listdir(samples) if f.endswith('.wav'))
  assert [f for f in wavs if f.startswith('before_')] and len(wavs) % 2 == 0
  for wav in wavs:
    waveform, sample_rate = codec.read_wav(os.path.join(samples, wav))
    assert sample_rate == codec.STANDARD_SAMPLE_RATE
    # Up to the first EOS: at most the cap of num_frames + 1 tokens.
    assert 0 < waveform.size <= (task.config.num_frames + 1) * task.codec.frame_samples
  assert os.path.getsize(os.path.join(samples, 'after_spectrograms.png')) > 1000


# GRPO asks for 8 samples of each prompt in one request, which must fit max_batch_size 8.
_ONE_PROMPT_PER_REQUEST = ('--set', 'actor.prompts_per_request=1')


def _learner_metrics(run_dir: str) -> list[dict]:
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert [r['step'] for r in learner] == [4, 8]
  return learner


def test_grpo_records_group_relative_advantages_and_learns_from_them(tmp_path):
  run_dir = str(tmp_path / 'text_grpo')
  summary = _run('text_grpo', run_dir, *_ONE_PROMPT_PER_REQUEST)
  assert summary['learner_steps'] == _STEPS
  assert summary['final_eval']['param_versions'] == [_STEPS]
  learner = _learner_metrics(run_dir)
  assert all(0 <= r['zero_advantage_fraction'] <= 1 and r['kl'] >= 0 for r in learner)
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  by_actor = {}
  for episode in episodes:
    by_actor.setdefault(episode.actor_id, []).append(episode)
  groups = 0
  for actor_episodes in by_actor.values():
    actor_episodes.sort(key=lambda e: e.episode_id)
    # Each request is one prompt's group of 8, recorded in order; a stopped actor may
    # leave its last group incomplete.
    for start in range(0, len(actor_episodes) - 7, 8):
      group = actor_episodes[start:start + 8]
      assert len({e.prompt_id for e in group}) == 1
      np.testing.assert_allclose(
          [e.extras['advantage'] for e in group],
          grpo.group_advantages(np.array([[e.reward for e in group]]), epsilon=1e-4)[0],
          rtol=1e-5, atol=1e-6)
      groups += 1
  assert groups >= _STEPS // 2


def test_ppo_trains_policy_and_value_over_epochs(tmp_path):
  run_dir = str(tmp_path / 'text_ppo')
  summary = _run('text_ppo', run_dir)
  assert summary['learner_steps'] == _STEPS
  assert summary['final_eval']['param_versions'] == [_STEPS]
  learner = _learner_metrics(run_dir)
  # Epochs after the first move the policy away from the sampler's, so some ratios clip.
  assert any(r['clip_fraction'] > 0 for r in learner)
  assert all(np.isfinite(r['value_loss']) for r in learner)
  assert all(not e.extras for e in read_trajectories(os.path.join(run_dir, 'rlds')))


@pytest.mark.parametrize('extra', [(), _LEARNED_PREFERENCE_MODEL])
def test_oaif_learns_from_judged_pairs_online_then_offline_from_their_record(extra, tmp_path):
  online_dir = str(tmp_path / 'online')
  summary = _run('text_oaif', online_dir, *extra)
  assert summary['learner_steps'] == _STEPS
  learner = _learner_metrics(online_dir)
  assert all(0 <= r['pair_accuracy'] <= 1 and 0 <= r['label_accuracy'] <= 1 for r in learner)
  task = reverse_digits.ReverseDigitsTask()
  episodes = read_trajectories(os.path.join(online_dir, 'rlds'))
  assert len(episodes) >= _STEPS * 8
  for episode in episodes:
    assert sorted(episode.extras) == ['rejected_reward', 'rejected_tokens']
    prompt = task.prompt_from_id(episode.prompt_id)
    assert episode.extras['rejected_reward'] == pytest.approx(
        task.reward(prompt, episode.extras['rejected_tokens']))
  learned = 'reward_model.log' in os.listdir(os.path.join(online_dir, 'logs'))
  assert learned == bool(extra)
  assert ('preference' in _served_versions(online_dir)) == learned
  if learned:
    return
  # Offline DPO: the recorded pairs, read back from RLDS by the learner; no actors.
  offline_dir = str(tmp_path / 'offline')
  summary = _run('text_oaif', offline_dir, '--replay-dataset', os.path.join(online_dir, 'rlds'))
  assert summary['learner_steps'] == _STEPS and summary['episodes'] == 0
  assert not os.path.exists(os.path.join(offline_dir, 'rlds'))
  assert all(0 <= r['label_accuracy'] <= 1 for r in _learner_metrics(offline_dir))
