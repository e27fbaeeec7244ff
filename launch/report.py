"""Progress lines on the terminal, summary.json and curves.png from a run's metrics.jsonl."""
import json
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from chorus.launch import cost
from chorus.metrics import read_metrics
from chorus.models import codec


def _latest_per_node(records: list[dict], kind: str) -> dict[str, dict]:
  latest = {}
  for record in records:
    if record.get('kind') == kind:
      latest[record['node']] = record
  return latest


# Learner metrics every progress line shows when reported: (name, label); the agent adds
# its own (AgentBuilder.progress_metrics).
PROGRESS_METRICS = (('task_reward', 'reward'), ('policy_lag', 'lag'), ('loss', 'loss'))


class Progress:
  """Turns the growing metrics.jsonl into one terminal line per call.

  Reads only what was appended since the last call: the file grows by every node's
  lines, and re-reading all of it every few seconds would cost the launcher quadratic time.

  Args:
    metrics_path: the run's metrics.jsonl.
    max_steps: the learner's step budget.
    agent_metrics: (name, label) of the agent's learner metrics to show too.
  """

  def __init__(self, metrics_path: str, max_steps: int,
               agent_metrics: tuple[tuple[str, str], ...] = ()):
    self._path = metrics_path
    self._max_steps = max_steps
    self._metrics = PROGRESS_METRICS + tuple(agent_metrics)
    self._offset = 0
    self._actors: dict[str, dict] = {}
    self._learner: dict | None = None
    self._last = None  # (time, episodes, tokens)

  def _read_new_lines(self):
    try:
      with open(self._path, 'rb') as file:
        file.seek(self._offset)
        data = file.read()
    except FileNotFoundError:
      return
    whole = data[:data.rfind(b'\n') + 1]  # A line still being written waits for next time.
    self._offset += len(whole)
    for line in whole.splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('kind') in ('actor', 'actor_final'):
        self._actors[record['node']] = record
      elif record.get('kind') == 'learner':
        self._learner = record

  def line(self, now: float) -> str:
    self._read_new_lines()
    episodes = sum(r['episodes'] for r in self._actors.values())
    tokens = sum(r['generated_tokens'] for r in self._actors.values())
    rates = ''
    if self._last:
      elapsed = max(now - self._last[0], 1e-6)
      rates = (f' ({(episodes - self._last[1]) / elapsed:.1f}/s) | tokens/s '
               f'{(tokens - self._last[2]) / elapsed:.0f}')
    self._last = (now, episodes, tokens)
    text = f'episodes {episodes}{rates}'
    if self._learner:
      last = self._learner
      text = f'step {last["step"]}/{self._max_steps} | {text} | ' + ' | '.join(
          f'{label} {last[name]:.3f}' for name, label in self._metrics if name in last)
    else:
      text = f'step 0/{self._max_steps} | {text}'
    return text


def run_cost(records: list[dict], rl_window: tuple[float, float], episodes: int) -> dict:
  """CPU-seconds per node (whole run and RL phase), per episode, and the learner's duty cycle."""
  ledger = cost.CpuLedger(records)
  rl_cpu = ledger.by_node(*rl_window)
  total = sum(rl_cpu.values())
  # Imports and config of the nodes started for RL (actors, learner, evaluator).
  startup = ledger.startup(*rl_window)
  per_episode = lambda seconds: 1000 * seconds / episodes if episodes else None
  return dict(
      rl_window=list(rl_window),
      rl_cpu_seconds=total,
      rl_startup_cpu_seconds=startup,
      cpu_ms_per_episode=per_episode(total),
      cpu_ms_per_episode_after_startup=per_episode(total - startup),
      rl_cpu_seconds_by_node=rl_cpu,
      cpu_seconds_by_node=ledger.by_node(),
      learner_duty_cycle=cost.learner_duty_cycle(records),
      # Other programs on the machine slow the run's wall clock, not its CPU-seconds much.
      load_average_1min=os.getloadavg()[0], cpu_count=os.cpu_count())


def summarize(run_dir: str, metrics_path: str, config: dict, *, initial_eval: dict,
              final_eval: dict, rl_window: tuple[float, float], wall_seconds: float,
              restarts: dict[str, int]) -> dict:
  """Writes run_dir/summary.json and returns it.

  `rl_window` is (start, end) of the RL phase as wall times (time.time()): actors and
  learner started -> the learner done.
  """
  records = read_metrics(metrics_path)
  rl_seconds = rl_window[1] - rl_window[0]
  learner = [r for r in records if r.get('kind') == 'learner']
  actor_final = _latest_per_node(records, 'actor_final')
  actor_latest = _latest_per_node(records, 'actor')
  actor_latest.update(actor_final)
  episodes = sum(r['episodes'] for r in actor_latest.values())
  tokens = sum(r['generated_tokens'] for r in actor_latest.values())
  summary = dict(
      config=config,
      learner_steps=learner[-1]['step'] if learner else 0,
      episodes=episodes,
      generated_tokens=tokens,
      initial_eval_reward=initial_eval['reward'],
      final_eval_reward=final_eval['reward'],
      initial_eval=initial_eval,
      final_eval=final_eval,
      tokens_per_second=tokens / rl_seconds if rl_seconds > 0 else 0.0,
      episodes_per_second=episodes / rl_seconds if rl_seconds > 0 else 0.0,
      mean_policy_lag=float(np.mean([r['policy_lag'] for r in learner])) if learner else None,
      max_policy_lag=float(np.max([r['max_policy_lag'] for r in learner])) if learner else None,
      rl_seconds=rl_seconds,
      wall_seconds=wall_seconds,
      restarts=restarts,
      actor_episode_digests={node: r.get('episode_digest') for node, r in actor_final.items()},
      cost=run_cost(records, rl_window, episodes),
      time_to_reward=cost.time_to_reward(records, cost.CpuLedger(records), rl_window[0]),
  )
  with open(os.path.join(run_dir, 'summary.json'), 'w') as file:
    json.dump(summary, file, indent=2)
  return summary


def plot_curves(run_dir: str, metrics_path: str, *, initial_eval: dict, final_eval: dict) -> str:
  """Reward and loss against learner step, with the held-out evaluations; returns the path."""
  records = read_metrics(metrics_path)
  learner = [r for r in records if r.get('kind') == 'learner']
  steps = [r['step'] for r in learner]
  fig, (ax_reward, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
  if learner and 'task_reward' in learner[-1]:
    ax_reward.plot(steps, [r['task_reward'] for r in learner], label='training batch reward')
  evals = [r for r in records if r.get('kind') == 'eval']
  if evals:
    ax_reward.plot([r['param_version'] for r in evals], [r['reward'] for r in evals], 's-',
                   markersize=4, label='held-out eval reward (evaluator node)')
  if learner:
    ax_reward.plot([0, steps[-1]], [initial_eval['reward'], final_eval['reward']], 'o',
                   markersize=8, label='held-out eval reward (before / after RL)')
  ax_reward.set_xlabel('learner step')
  ax_reward.set_ylabel('reward')
  ax_reward.legend()
  ax_reward.grid(alpha=0.3)
  for name in ('loss', 'value_loss', 'td_error', 'nll', 'kl_to_anchor', 'reverse_kl'):
    if learner and name in learner[-1]:
      ax_loss.plot(steps, [r[name] for r in learner], label=name.replace('_', ' '))
  ax_loss.set_xlabel('learner step')
  ax_loss.set_ylabel('loss')
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(run_dir, 'curves.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_spectrograms(wav_paths: list[str], path: str) -> str:
  """One spectrogram per WAV file, titled with its name; returns the plot's path."""
  fig, axes = plt.subplots(1, len(wav_paths), figsize=(4 * len(wav_paths), 3.2), squeeze=False)
  for ax, wav_path in zip(axes[0], wav_paths):
    waveform, sample_rate = codec.read_wav(wav_path)
    if waveform.size:
      with np.errstate(divide='ignore'):  # Silent frames have zero power: -inf dB.
        ax.specgram(waveform, NFFT=512, Fs=sample_rate, noverlap=256, cmap='magma')
    ax.set_title(os.path.basename(wav_path)[:-4], fontsize=8)
    ax.set_xlabel('s')
    ax.set_ylabel('Hz')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
