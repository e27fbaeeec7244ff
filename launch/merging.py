"""Iterated merging of RL runs: M experiments from one init, merged in weight space, I times.

`chorus merge-runs --config NAME`: iteration i runs the experiment M times (other seeds)
from the same init theta_init, merges the final policies by spherical interpolation of
their task vectors theta_m - theta_init (`weight_averaging.slerp_task_vectors`) and moves
the init towards the merge, theta_init <- (1 - eta) theta_init + eta theta_merged
(`weight_averaging.liti`); the next iteration starts from there. Iteration 0's init is
the first run's warm start (the others start from it too), which is also the reference
`pi_ref` every KL below is measured against.

Along the way it evaluates, on the task's held-out prompts, the reward of samples at
temperature 1 and KL(pi || pi_ref) (the mean over prompts of the sampled completion's
log-ratio) of the interpolations theta_init + w * (theta - theta_init) towards each
plain run's final policy and towards each merge: the KL-reward front of the plain runs
and of every iteration, in `front.json` and `front.png`.

Run directory:
    iteration_<i>/run_<m>/     each experiment's own run directory
    iteration_<i>/merged/      the merged policy (orbax, step 0)
    iteration_<i>/init/        the next iteration's init after LITI (orbax, step 0)
    front.json, front.png      every evaluated point, and the front's plot
    summary.json               settings, per-run summaries, the gain at equal KL
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from chorus import models
from chorus.inference_server import sampler as sampler_lib
from chorus.launch import evaluate
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.launch import run as run_lib
from chorus.launch import run_dir as layout
from chorus.learners import policy
from chorus.learners import weight_averaging
from chorus.models.checkpoints import Checkpointer

INTERPOLATION_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class MergeSettings:
  """How runs are merged.

  Attributes:
    num_runs: M, experiments per iteration.
    iterations: I.
    liti_rate: eta of theta_init <- (1 - eta) theta_init + eta theta_merged.
    interpolation_weights: the w of the evaluated interpolations towards each final
      policy and each merge (eta is added for the merges).
  """
  num_runs: int = 2
  iterations: int = 2
  liti_rate: float = 0.3
  interpolation_weights: tuple[float, ...] = INTERPOLATION_WEIGHTS

  def __post_init__(self):
    if self.num_runs < 1 or self.iterations < 1:
      raise ValueError(f'num_runs and iterations must be >= 1; got {self.num_runs}, '
                       f'{self.iterations}.')
    if not 0 < self.liti_rate <= 1:
      raise ValueError(f'liti_rate must be in (0, 1]; got {self.liti_rate}.')


class FrontEvaluator:
  """Reward and KL to the reference of parameter sets, on the task's held-out prompts."""

  def __init__(self, config: experiment.ExperimentConfig, reference_params, seed: int):
    self._task = config.make_task()
    self._model = config.model.decoder_config()
    self._prompts = self._task.eval_prompts()
    self._prompt_tokens, self._prompt_mask = models.left_pad_prompts(
        [self._task.encode_prompt(p) for p in self._prompts], config.sequence.prompt_len)
    length = config.sequence.completion_len
    self._sample = sampler_lib.make_sampler(self._model, config.sequence.prompt_len, length)
    self._max_new_tokens = np.full(len(self._prompts), length, np.int32)
    self._reference = reference_params
    self._rng = jax.random.PRNGKey(seed)
    self._logprobs = jax.jit(lambda params, tokens, mask: policy.evaluate_tokens(
        self._model, params, self._prompt_tokens, self._prompt_mask, tokens, mask).logprobs)

  def __call__(self, params) -> dict[str, float]:
    """{'reward', 'kl', 'greedy_reward'} of `params`; the same samples' seed every call."""
    result = {}
    for name, temperature in (('reward', 1.0), ('greedy_reward', 0.0)):
      output = self._sample(params, self._prompt_tokens, self._prompt_mask,
                            np.full(len(self._prompts), temperature, np.float32),
                            self._max_new_tokens, self._rng)
      tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
      result[name] = float(np.mean([self._task.reward(p, tokens[i, :lengths[i]])
                                    for i, p in enumerate(self._prompts)]))
      if temperature == 1.0:
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        log_ratio = self._logprobs(params, tokens, mask) - self._logprobs(self._reference,
                                                                          tokens, mask)
        result['kl'] = float(jnp.mean(jnp.sum(jnp.where(mask, log_ratio, 0.0), axis=1)))
    return result


def _save(directory: str, params) -> str:
  Checkpointer(directory).save(0, params)
  return directory


def _starting_from(config: experiment.ExperimentConfig, init_dir: str, seed: int):
  return dataclasses.replace(config, seed=seed, warm_start=dataclasses.replace(
      config.warm_start, init=init_dir, steps=0))


def gain_at_equal_kl(baseline: list[dict], points: list[dict]) -> float | None:
  """Mean reward of `points` above the baseline's upper front at the same KL.

  The baseline front is the upper envelope of its points, linear in KL between them;
  points outside its KL range are left out. None if none is inside.
  """
  ordered = sorted(baseline, key=lambda p: p['kl'])
  kls, envelope, best = [], [], -np.inf
  for point in ordered:
    best = max(best, point['reward'])
    kls.append(point['kl'])
    envelope.append(best)
  gains = [p['reward'] - float(np.interp(p['kl'], kls, envelope)) for p in points
           if kls[0] <= p['kl'] <= kls[-1]]
  return float(np.mean(gains)) if gains else None


def plot_front(path: str, points: list[dict]) -> None:
  """Reward against KL: dashed lines towards each plain run, solid towards each merge."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axis = pyplot.subplots(figsize=(7, 5))
  colors = pyplot.rcParams['axes.prop_cycle'].by_key()['color']
  curves = sorted({(p['iteration'], p['kind'], p['run']) for p in points if p['kind'] != 'init'},
                  key=lambda c: (c[0], c[1], -1 if c[2] is None else c[2]))
  for iteration, kind, run in curves:
    init = next(p for p in points if p['iteration'] == iteration and p['kind'] == 'init')
    curve = sorted([init] + [p for p in points if (p['iteration'], p['kind'], p['run'])
                             == (iteration, kind, run)], key=lambda p: p['weight'])
    label = (f'iteration {iteration}: merge' if kind == 'merged'
             else f'iteration {iteration}: runs' if run == 0 else None)
    axis.plot([p['kl'] for p in curve], [p['reward'] for p in curve],
              '-o' if kind == 'merged' else '--.', color=colors[iteration % len(colors)],
              alpha=1.0 if kind == 'merged' else 0.5, label=label)
  liti = [p for p in points if p.get('liti')]
  axis.plot([p['kl'] for p in liti], [p['reward'] for p in liti], 'k*', markersize=12,
            label='next init (LITI)')
  axis.set_xlabel('KL(policy || reference), nats per completion')
  axis.set_ylabel('held-out reward (temperature 1)')
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


def merge_runs(config: experiment.ExperimentConfig, run_dir: str, settings: MergeSettings,
               print_fn=print) -> dict:
  """Runs the iterations; returns the summary (also in RUN_DIR/summary.json)."""
  start = time.monotonic()
  run_dir = os.path.abspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  init_dir, evaluator, points, runs = None, None, [], []
  for iteration in range(settings.iterations):
    finals = []
    for index in range(settings.num_runs):
      seed = config.seed + 1000 * iteration + index
      directory = os.path.join(run_dir, f'iteration_{iteration}', f'run_{index}')
      run_config = (dataclasses.replace(config, seed=seed) if init_dir is None
                    else _starting_from(config, init_dir, seed))
      print_fn(f'[{time.monotonic() - start:6.0f}s] iteration {iteration}, run {index}: '
               f'{directory}')
      summary = run_lib.run_experiment(run_config, directory, print_fn=print_fn)
      runs.append(dict(iteration=iteration, run=index, run_dir=directory,
                       **{key: summary[key] for key in ('initial_eval_reward',
                                                        'final_eval_reward', 'wall_seconds')}))
      init_dir = init_dir or layout.warm_start_dir(directory)
      finals.append(evaluate.load_params(directory, run_config)[0])
    # Every run of the iteration started from these parameters (its warm start).
    init = nodes.warm_start_params(config, os.path.join(run_dir, f'iteration_{iteration}',
                                                        'run_0'))
    if evaluator is None:  # Iteration 0's init is the reference of every KL.
      evaluator = FrontEvaluator(config, init, config.seed)
    merged = weight_averaging.slerp_task_vectors(init, finals)
    _save(os.path.join(run_dir, f'iteration_{iteration}', 'merged'), merged)
    points.append(dict(iteration=iteration, kind='init', run=None, weight=0.0, **evaluator(init)))
    targets = [('run', index, final) for index, final in enumerate(finals)]
    targets.append(('merged', None, merged))
    for kind, index, target in targets:
      weights = settings.interpolation_weights
      if kind == 'merged':
        weights = sorted(set(weights) | {settings.liti_rate})
      for weight in weights:
        point = dict(iteration=iteration, kind=kind, run=index, weight=weight,
                     **evaluator(weight_averaging.lerp(init, target, weight)))
        if kind == 'merged' and weight == settings.liti_rate:
          point['liti'] = True
        points.append(point)
        print_fn(f'[{time.monotonic() - start:6.0f}s] {json.dumps(point)}')
    init_dir = _save(os.path.join(run_dir, f'iteration_{iteration}', 'init'),
                     weight_averaging.liti(init, merged, settings.liti_rate))
  baseline = [p for p in points if p['iteration'] == 0 and p['kind'] in ('init', 'run')]
  summary = dict(
      config=experiment.to_dict(config), settings=dataclasses.asdict(settings), runs=runs,
      gain_at_equal_kl={
          str(i): gain_at_equal_kl(baseline, [p for p in points if p['iteration'] == i
                                              and p['kind'] == 'merged'])
          for i in range(settings.iterations)},
      wall_seconds=time.monotonic() - start)
  with open(os.path.join(run_dir, 'front.json'), 'w') as file:
    json.dump(points, file, indent=1)
  with open(layout.summary_path(run_dir), 'w') as file:
    json.dump(summary, file, indent=2)
  plot_front(os.path.join(run_dir, 'front.png'), points)
  return summary
