"""Offline evaluation of learner checkpoints, each served in-process on 127.0.0.1.

`chorus evaluate`: a run's checkpoint on the prompts of a recorded dataset.
`chorus interpolate`: linear interpolations of two runs' final weights (say, a quality-only
and a diversity-rewarded CFG distillation), each evaluated on the task's held-out prompts.
"""
from collections.abc import Iterator
import contextlib
import json
import os

import jax
import numpy as np

from chorus import datasets
from chorus import models
from chorus.actors.evaluation import evaluate
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.launch import run_dir as layout
from chorus.models import lora
from chorus.models.checkpoints import Checkpointer


def load_config(run_dir: str) -> experiment.ExperimentConfig:
  path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; is {run_dir} a run directory of '
                            '`chorus run`?')
  with open(path) as file:
    return experiment.load_experiment(json.load(file))


def load_params(run_dir: str, config: experiment.ExperimentConfig, step: int | None = None):
  """(policy params, step) of a run's learner checkpoint; the latest unless `step`.

  The parameters are those of `config.model.base_decoder_config()`: a run that trained
  LoRA adapters checkpoints only them, merged here into its warm start's weights.
  """
  checkpointer = Checkpointer(layout.learner_checkpoint_dir(run_dir))
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No learner checkpoint in {layout.learner_checkpoint_dir(run_dir)}.')
  base = (nodes.warm_start_params(config, run_dir) if config.model.lora.rank else
          models.init_params(config.model.base_decoder_config(), jax.random.PRNGKey(0)))
  template = nodes.make_learner(config, base, run_dir)
  params = checkpointer.restore(template.state, step=step).params
  checkpointer.close()
  if template.trains_adapters:
    params = lora.merge(template.full_params(params), config.model.decoder_config())
  return params, step


def load_policy(run_dir: str, config: experiment.ExperimentConfig, step: int | None = None):
  """(policy params, step) of a run: its learner checkpoint, else its warm start (step 0).

  Raises:
    FileNotFoundError: the run has neither, or not the learner checkpoint `step`.
  """
  learner_dir = layout.learner_checkpoint_dir(run_dir)
  if step is None and (not os.path.isdir(learner_dir)
                       or Checkpointer(learner_dir).latest_step() is None):
    return nodes.warm_start_params(config, run_dir), 0
  return load_params(run_dir, config, step)


@contextlib.contextmanager
def served_policy(config: experiment.ExperimentConfig, params,
                  version: int) -> Iterator[InferenceClient]:
  """A client of `params` served as 'policy' by an in-process server on loopback."""
  served = ServedModel('policy', config.model.base_decoder_config(), params, version=version,
                       config=config.inference, sequence=config.sequence)
  server, port = start_server({'policy': served}, '127.0.0.1:0')
  try:
    with InferenceClient(f'127.0.0.1:{port}') as client:
      yield client
  finally:
    server.stop(grace=1).wait()
    served.close()


def _evaluate_served(config: experiment.ExperimentConfig, params, version: int, **options) -> dict:
  """`evaluate` of `params` served as 'policy' by an in-process server on loopback."""
  with served_policy(config, params, version) as client:
    return evaluate(client.generate, config.make_task(),
                    batch_size=config.inference.max_batch_size, **options)


def evaluate_on_dataset(run_dir: str, dataset: str, *, step: int | None = None,
                        temperature: float = 1.0) -> dict:
  """Samples the checkpointed policy once per distinct prompt of `dataset`; scores with the task.

  Returns the checkpoint's mean reward on those prompts beside the mean reward the
  dataset recorded for them (its behaviour policy's), with the step and prompt count.
  """
  config = load_config(run_dir)
  task = config.make_task()
  params, step = load_params(run_dir, config, step)
  prompts = datasets.dataset_prompts(dataset)
  result = _evaluate_served(config, params, step, temperature=temperature,
                            prompts=[task.prompt_from_id(p.prompt_id) for p in prompts])
  recorded = datasets.read_trajectories(dataset)
  return dict(step=step, num_prompts=len(prompts), temperature=temperature,
              checkpoint_reward=result['reward'], checkpoint_exact_match=result['exact_match'],
              dataset_reward=float(np.mean([t.reward for t in recorded])),
              dataset_episodes=len(recorded))


def interpolate_runs(run_a: str, run_b: str, weights: list[float], *,
                     temperature: float = 1.0) -> list[dict]:
  """Evaluates (1 - w) * theta_a + w * theta_b for each w on the held-out prompts.

  Both runs must share the model; each result has the weight, the reward and its
  components, and for music tasks the diversity of two samples per prompt: the
  quality/diversity knob of weight interpolation, set at deploy time without training.
  """
  config, config_b = load_config(run_a), load_config(run_b)
  if config.model != config_b.model:
    raise ValueError(f'{run_a} and {run_b} train different models ({config.model} vs '
                     f'{config_b.model}); weights interpolate only within one architecture.')
  params_a, _ = load_params(run_a, config)
  params_b, _ = load_params(run_b, config_b)
  results = []
  for weight in weights:
    params = jax.tree_util.tree_map(lambda a, b: (1 - weight) * a + weight * b, params_a,
                                    params_b)
    result = _evaluate_served(config, params, 0, temperature=temperature,
                              with_diversity=config.guided_task)
    results.append(dict(weight=weight, reward=result['reward'],
                        reward_components=result['reward_components'],
                        diversity=result.get('diversity')))
  return results
