"""Runs one experiment end to end on the local launcher.

Phases: warm start -> replay and inference server up -> held-out evaluation of the
warm-started policy -> actors and learner (V-trace RL) until the learner's last step ->
held-out evaluation of the final policy -> stop everything -> summary.json, curves.png.
"""
import json
import logging
import math
import os
import signal
import time

from chorus import agents
from chorus.actors.evaluation import evaluate
from chorus.inference_server import auth
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.launch import cost
from chorus.launch import experiment
from chorus.launch import run_dir as layout
from chorus.launch import program as program_lib
from chorus.launch import report
from chorus.launch.launcher_config import LauncherConfig
from chorus.launch.local import LocalLauncher


class _StopRequested:
  """SIGINT/SIGTERM to the launcher: stop the run cleanly at the next check."""

  def __init__(self):
    self.requested = False
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, self._handle)

  def _handle(self, signum, unused_frame):
    if self.requested:  # A second Ctrl-C: stop waiting politely.
      raise KeyboardInterrupt
    self.requested = True
    print(f'\n{signal.Signals(signum).name}: stopping all nodes...', flush=True)

  def __call__(self) -> bool:
    return self.requested


def _evaluate(config: experiment.ExperimentConfig, address: str, min_version: int) -> dict:
  """Held-out evaluation on the served policy once it serves `min_version` or newer."""
  with InferenceClient(address, tls_dir=config.inference.tls_dir) as client:
    deadline = time.monotonic() + 120
    while client.status()['policy']['param_version'] < min_version:
      if time.monotonic() > deadline:
        raise TimeoutError(f'Inference server never reached version {min_version}.')
      time.sleep(0.2)
    task = config.make_task()
    settings = dict(batch_size=config.inference.max_batch_size)
    result = evaluate(client.generate, task, temperature=config.evaluation.temperature,
                      opponent_model=agents.REFERENCE_MODEL,
                      with_diversity=config.guided_task, **settings)
    greedy = evaluate(client.generate, task, temperature=config.evaluation.greedy_temperature,
                      **settings)
    teacher_scale = config.evaluation.cfg_teacher_guidance_scale
    if config.guided_task and teacher_scale > 0:
      # The frozen warm start with classifier-free guidance: the teacher of CFG
      # distillation, and what guidance buys on any music run.
      result['cfg_teacher'] = evaluate(
          client.generate, task, temperature=config.evaluation.temperature,
          model=agents.REFERENCE_MODEL, guidance_scale=teacher_scale,
          with_diversity=True, **settings)
  result['greedy_reward'] = greedy['reward']
  result['greedy_exact_match'] = greedy['exact_match']
  return result


def _write_audio_samples(config: experiment.ExperimentConfig, address: str, run_dir: str,
                         tag: str, num_captions: int = 4) -> list[str]:
  """WAV files of the served policy on fixed captions (held-out ones first), and a plot."""
  task = config.make_task()
  prompts = list({p.prompt_id: p for p in task.eval_prompts()}.values())[:num_captions]
  with InferenceClient(address, tls_dir=config.inference.tls_dir) as client:
    result = client.generate([task.encode_prompt(p) for p in prompts],
                             temperature=config.evaluation.temperature)
  os.makedirs(os.path.join(run_dir, 'samples'), exist_ok=True)
  paths = []
  for prompt, completion in zip(prompts, result.completions):
    path = os.path.join(run_dir, 'samples', f'{tag}_{prompt.prompt_id.replace(" ", "_")}.wav')
    task.write_audio(path, completion.tokens)
    paths.append(path)
  report.plot_spectrograms(paths, os.path.join(run_dir, 'samples', f'{tag}_spectrograms.png'))
  return paths


def _wait_for_services(launcher, inference_address: str, should_stop, *, tls_dir: str,
                       poll_s: float = 1.0):
  """Waits until the first inference server answers, however long its start-up takes
  (compiling every batch shape of big models can take minutes), as long as every
  service node is alive; a node that dies is reported within `poll_s` (NodeFailed)."""
  with InferenceClient(inference_address, tls_dir=tls_dir) as client:
    while not should_stop():
      launcher.poll()  # Raises NodeFailed, with the node's log, if a service died.
      try:
        client.wait_until_ready(timeout_s=poll_s)
        return
      except InferenceError:
        continue
  raise KeyboardInterrupt


def summary_problems(summary: dict) -> list[str]:
  """Why a finished run's summary is not a success (empty if it is): a learner that never
  updated, or a final evaluation that is not a finite number."""
  problems = []
  if not summary.get('learner_steps'):
    problems.append('the learner never updated the policy (learner_steps is '
                    f'{summary.get("learner_steps")})')
  for key in ('final_eval_reward', 'initial_eval_reward'):
    value = summary.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      problems.append(f'{key} is {value}, not a finite number')
  return problems


LAUNCHERS = ('local', 'ray')


def make_launcher(name: str, run_dir: str, config: LauncherConfig, *,
                  ray_address: str | None = None, num_nodes: int = 1):
  """The launcher that decides where nodes run: this machine's processes, or a Ray cluster.

  `num_nodes` is how many nodes run at once, so that a Ray instance the launcher starts
  has a placement slot for each.
  """
  if name == 'local':
    return LocalLauncher(run_dir, config)
  if name == 'ray':
    from chorus.launch.ray_launcher import RayLauncher  # pylint: disable=g-import-not-at-top
    return RayLauncher(run_dir, config, address=ray_address, num_nodes=num_nodes)
  raise ValueError(f'Unknown launcher {name!r}; use one of {LAUNCHERS}.')


def run_experiment(config: experiment.ExperimentConfig, run_dir: str, *, launcher: str = 'local',
                   ray_address: str | None = None, resume: bool = False,
                   progress_every_s: float = 5.0, print_fn=print, progress_fn=None) -> dict:
  """Runs `config`, one process per node; returns the summary (also in summary.json).

  `resume` continues the run in `run_dir` (stopped, or finished with a smaller step
  budget): setup nodes that finished are not run again, the learner restores its newest
  checkpoint, actors append to the RLDS record and every node to metrics.jsonl. The
  summary's rates and costs are of this session; learner_steps counts them all.

  `print_fn` gets every line for the terminal; `progress_fn` (default: `print_fn`) the
  periodic progress lines of RL.
  """
  layout.check_run_dir(run_dir, resume)
  progress_fn = progress_fn or print_fn
  start = time.monotonic()
  run_dir = os.path.abspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  config_dict = experiment.to_dict(config)
  config.check()
  # The run's secret (inference_server/auth.py): in the environment that every node
  # inherits (the Ray launcher hands it to each node's host), never on disk or in a log.
  os.environ[auth.SECRET_ENV] = auth.new_secret()
  with open(layout.config_path(run_dir), 'w') as file:
    json.dump(config_dict, file, indent=2)
  metrics_path = layout.metrics_path(run_dir)
  # The launcher's own CPU (progress lines, supervision); its children meter themselves.
  meter = cost.CpuMeter(metrics_path, cost.LAUNCHER_NODE, include_children=False)
  stop = _StopRequested()
  program = program_lib.make_program(config)
  by_kind = {kind: [node for node in program if node.kind == kind] for kind in program_lib.KINDS}
  launcher = make_launcher(launcher, run_dir, config.launcher, ray_address=ray_address,
                           num_nodes=program_lib.max_nodes_at_once(program))
  print_fn(f'Run directory: {run_dir} (logs in {run_dir}/logs)')
  try:
    for node in by_kind[program_lib.SETUP]:
      done_path = layout.setup_done_path(run_dir, node.name)
      if os.path.exists(done_path):  # Resumed: its checkpoint or data are in the run.
        print_fn(f'[{time.monotonic() - start:6.0f}s] {node.name}: done before')
        continue
      print_fn(f'[{time.monotonic() - start:6.0f}s] {node.name}...')
      launcher.run_to_completion(node, stop)
      if stop():
        raise KeyboardInterrupt
      with open(done_path, 'w'):
        pass
    launcher.start(by_kind[program_lib.SERVICE])
    inference_address = launcher.addresses[program_lib.inference_server_name(0)]
    _wait_for_services(launcher, inference_address, stop, tls_dir=config.inference.tls_dir)
    initial_eval = _evaluate(config, inference_address, min_version=0)
    if config.guided_task:
      _write_audio_samples(config, inference_address, run_dir, 'before')
    print_fn(f'[{time.monotonic() - start:6.0f}s] initial eval: reward '
             f'{initial_eval["reward"]:.3f}, exact match {initial_eval["exact_match"]:.3f}')
    if stop():
      raise KeyboardInterrupt
    rl_start_time = time.time()  # Wall time: the nodes' CPU samples carry time.time().
    launcher.start(by_kind[program_lib.WORKER] + by_kind[program_lib.MAIN])
    progress = report.Progress(metrics_path, config.learner.max_steps,
                               config.builder().progress_metrics)
    next_print = time.monotonic() + progress_every_s
    while launcher.poll() and not stop():
      time.sleep(0.2)
      if time.monotonic() >= next_print:
        progress_fn(f'[{time.monotonic() - start:6.0f}s] {progress.line(time.monotonic())}')
        next_print += progress_every_s
    if stop():
      raise KeyboardInterrupt  # `finally` stops the learner first, then actors, then services.
    rl_end_time = time.time()
    launcher.stop((program_lib.WORKER,))
    final_eval = _evaluate(config, inference_address, min_version=config.learner.max_steps)
    if config.guided_task:
      _write_audio_samples(config, inference_address, run_dir, 'after')
    print_fn(f'[{time.monotonic() - start:6.0f}s] final eval: reward {final_eval["reward"]:.3f}, '
             f'exact match {final_eval["exact_match"]:.3f}')
  finally:
    launcher.close()
  report.plot_curves(run_dir, metrics_path, initial_eval=initial_eval, final_eval=final_eval)
  meter.stop()  # After the plots (a CPU-second or two), before the summary that reads it.
  summary = report.summarize(run_dir, metrics_path, config_dict, initial_eval=initial_eval,
                             final_eval=final_eval, rl_window=(rl_start_time, rl_end_time),
                             wall_seconds=time.monotonic() - start, restarts=launcher.restarts)
  logging.info('summary: %s', summary)
  return summary
