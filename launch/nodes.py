"""Node entry points: build each role's objects from the experiment config and run them.

This is Acme's builder: roles know only their own configs and clients; the wiring
(addresses, run-directory layout) lives here. Every entry point takes
(config, run_dir, should_stop, **handles) and returns when done or told to stop.
"""
from collections.abc import Callable
import logging
import os
import threading
import time

import jax
import numpy as np

from chorus import core
from chorus import models
from chorus.actors.actor import Actor
from chorus.actors.evaluation import evaluate
from chorus.datasets import EpisodeLogger
from chorus.inference_server import server as server_lib
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import ParameterPublisher
from chorus.launch.experiment import ExperimentConfig
from chorus.learners import loop
from chorus.learners import supervised
from chorus.learners import vtrace_learner
from chorus.metrics import MetricsWriter
from chorus.models.checkpoints import Checkpointer
from chorus.replay import dataset
from chorus.replay import tables
from chorus.replay.writer import TrajectoryWriter

StopFn = Callable[[], bool]


# The run directory's layout, in one place.
def metrics_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'metrics.jsonl')


def warm_start_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'warm_start')


def learner_checkpoint_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'learner')


def rlds_dir(run_dir: str, actor_id: int | None = None) -> str:
  base = os.path.join(run_dir, 'rlds')
  return base if actor_id is None else os.path.join(base, f'actor_{actor_id:03d}')


def tensorboard_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'tensorboard')


def _initial_params(config: ExperimentConfig):
  return models.init_params(config.model, jax.random.PRNGKey(config.seed))


def _warm_start_params(config: ExperimentConfig, run_dir: str):
  return Checkpointer(warm_start_dir(run_dir)).restore(_initial_params(config))


def demonstration_batches(config: ExperimentConfig, task, batch_size: int):
  """Endless TrajectoryBatch of the task's demonstrations (behaviour log-probs unknown: 0)."""
  rng = np.random.default_rng([config.seed, 7])
  prompt_len, completion_len = config.inference.max_prompt_len, config.inference.max_new_tokens
  while True:
    trajectories = []
    for _ in range(batch_size):
      prompt = task.train_prompt(rng)
      completion = task.encode_completion(task.demonstration(prompt, rng))
      trajectories.append(core.Trajectory(
          prompt_tokens=np.asarray(task.encode_prompt(prompt), np.int32),
          completion_tokens=np.asarray(completion, np.int32),
          behaviour_logprobs=np.zeros(len(completion), np.float32),
          reward=task.reward(prompt, completion), terminated=True, param_version=0))
    yield core.batch_trajectories(trajectories, prompt_len, completion_len)


def warm_start(config: ExperimentConfig, run_dir: str, should_stop: StopFn):
  """Supervised warm start on demonstrations; its params are version 0 and the reference."""
  metrics = MetricsWriter(metrics_path(run_dir), 'warm_start')
  task = config.make_task()
  start = time.monotonic()
  params, history = supervised.warm_start(
      config.model, config.warm_start,
      demonstration_batches(config, task, config.warm_start.batch_size),
      _initial_params(config))
  for record in history[::max(1, len(history) // 20)] + history[-1:]:
    metrics.write(kind='warm_start', **record)
  Checkpointer(warm_start_dir(run_dir)).save(0, params)
  logging.info('Warm start: %d steps in %.1f s, final nll %.3f', config.warm_start.steps,
               time.monotonic() - start, history[-1]['nll'] if history else float('nan'))


def replay(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, port: int,
           host: str = '127.0.0.1'):
  del run_dir, host  # Reverb 0.14 cannot bind to one address (see replay/tables.py).
  tables.serve(config.replay, config.inference.max_prompt_len, config.inference.max_new_tokens,
               port, should_stop)


def inference_server(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
                     server_index: int, port: int, host: str = '127.0.0.1',
                     status_every_s: float = 5.0):
  served = server_lib.ServedModel('policy', config.model, _warm_start_params(config, run_dir),
                                  version=0, config=config.inference)
  served.warm_up()
  grpc_server, _ = server_lib.start_server({'policy': served}, f'{host}:{port}',
                                           config.inference.num_threads)
  logging.info('Inference server on %s:%d', host, port)
  metrics = MetricsWriter(metrics_path(run_dir), f'inference_server_{server_index}')
  while not should_stop():
    time.sleep(status_every_s)
    metrics.write(kind='inference', model='policy', param_version=served.param_version,
                  **served.counters_snapshot())
  grpc_server.stop(grace=2).wait()
  served.close()


def actor(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, actor_ids: list[int],
          inference_address: str, replay_address: str):
  """Runs one actor loop per id, each in its own thread with its own clients and RLDS shard."""
  client = InferenceClient(inference_address)
  client.wait_until_ready()
  errors = []

  def run_one(actor_id: int):
    try:
      writer = TrajectoryWriter(replay_address, config.replay.table,
                                config.inference.max_prompt_len, config.inference.max_new_tokens)
      with EpisodeLogger(rlds_dir(run_dir, actor_id),
                         max_episodes_per_file=config.rlds_episodes_per_file) as episode_logger:
        Actor(actor_id, config.actor, config.make_task(), generate=client.generate,
              write_replay=writer.write, log_episode=episode_logger.write,
              metrics=MetricsWriter(metrics_path(run_dir), f'actor_{actor_id}'),
              seed=config.seed).run(lambda: should_stop() or bool(errors))
      writer.close()
    except BaseException as error:  # pylint: disable=broad-except
      errors.append(error)  # Stops the sibling loops; the process then fails and restarts.
      raise

  threads = [threading.Thread(target=run_one, args=(i,), name=f'actor_{i}') for i in actor_ids]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  client.close()
  if errors:
    raise RuntimeError(f'{len(errors)} actor loop(s) failed; first: {errors[0]!r}')


def evaluator(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
              inference_address: str):
  """Evaluates the served policy on held-out prompts every `evaluation.every_s` seconds."""
  metrics = MetricsWriter(metrics_path(run_dir), 'evaluator')
  task = config.make_task()
  with InferenceClient(inference_address) as client:
    client.wait_until_ready()
    next_time = time.monotonic()
    while not should_stop():
      if time.monotonic() < next_time:
        time.sleep(0.2)
        continue
      result = evaluate(client.generate, task, temperature=config.evaluation.temperature,
                        batch_size=config.inference.max_batch_size)
      metrics.write(kind='eval', param_version=max(result.pop('param_versions')), **result)
      next_time = time.monotonic() + config.evaluation.every_s


def learner(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
            inference_addresses: list[str], replay_addresses: list[str]):
  reference_params = _warm_start_params(config, run_dir)
  learner_obj = vtrace_learner.VTraceLearner(
      config.model, config.vtrace, params=reference_params, reference_params=reference_params,
      optimizer=vtrace_learner.make_optimizer(config.learner.learning_rate,
                                              config.learner.max_grad_norm))
  checkpointer = Checkpointer(learner_checkpoint_dir(run_dir))
  publishers = [ParameterPublisher(address) for address in inference_addresses]
  for publisher in publishers:
    publisher.wait_until_ready()
  if checkpointer.latest_step() is not None:  # Resume after a crash or restart.
    learner_obj.state = checkpointer.restore(learner_obj.state)
    logging.info('Learner resumed at step %d', learner_obj.step)
  # A restarted learner may be behind what the servers serve (steps after its checkpoint,
  # or every step if it crashed before the first one): put its own version back.
  for publisher in publishers:
    publisher.publish(learner_obj.params, learner_obj.step, resume=True)

  def publish(params, version: int) -> float:
    return sum(publisher.publish(params, version) for publisher in publishers)

  batches = dataset.batch_iterator(replay_addresses, config.replay.table, config.learner.batch_size,
                                   config.inference.max_prompt_len, config.inference.max_new_tokens)
  loop.run_learner(learner_obj, batches, config.learner, publish=publish,
                   checkpoint=checkpointer.save,
                   metrics=MetricsWriter(metrics_path(run_dir), 'learner'),
                   tensorboard_dir=tensorboard_dir(run_dir), should_stop=should_stop)
  checkpointer.close()


ENTRY_POINTS = {
    'warm_start': warm_start,
    'replay': replay,
    'inference_server': inference_server,
    'actor': actor,
    'evaluator': evaluator,
    'learner': learner,
}
