"""`chorus evaluate`: a run's learner checkpoint on the prompts of a recorded dataset."""
import json
import os

import jax
import numpy as np

from chorus import datasets
from chorus import models
from chorus.actors.evaluation import evaluate
from chorus.inference_server import server as server_lib
from chorus.inference_server.client import InferenceClient
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.models.checkpoints import Checkpointer


def load_config(run_dir: str) -> experiment.ExperimentConfig:
  path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; is {run_dir} a run directory of '
                            '`chorus run`?')
  with open(path) as file:
    return experiment.from_dict(experiment.ExperimentConfig, json.load(file))


def evaluate_on_dataset(run_dir: str, dataset: str, *, step: int | None = None,
                        temperature: float = 1.0) -> dict:
  """Samples the checkpointed policy once per distinct prompt of `dataset`; scores with the task.

  Returns the checkpoint's mean reward on those prompts beside the mean reward the
  dataset recorded for them (its behaviour policy's), with the step and prompt count.
  """
  config = load_config(run_dir)
  task = config.make_task()
  checkpointer = Checkpointer(nodes.learner_checkpoint_dir(run_dir))
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No learner checkpoint in {nodes.learner_checkpoint_dir(run_dir)}.')
  template = nodes.make_learner(config, models.init_params(config.model, jax.random.PRNGKey(0)))
  params = checkpointer.restore(template.state, step=step).params
  checkpointer.close()
  prompts = datasets.dataset_prompts(dataset)
  served = server_lib.ServedModel('policy', config.model, params, version=step,
                                  config=config.inference)
  server, port = server_lib.start_server({'policy': served}, '127.0.0.1:0')
  try:
    with InferenceClient(f'127.0.0.1:{port}') as client:
      result = evaluate(client.generate, task, temperature=temperature,
                        batch_size=config.inference.max_batch_size,
                        prompts=[task.prompt_from_id(p.prompt_id) for p in prompts])
  finally:
    server.stop(grace=1).wait()
    served.close()
  recorded = datasets.read_trajectories(dataset)
  return dict(step=step, num_prompts=len(prompts), temperature=temperature,
              checkpoint_reward=result['reward'], checkpoint_exact_match=result['exact_match'],
              dataset_reward=float(np.mean([t.reward for t in recorded])),
              dataset_episodes=len(recorded))
