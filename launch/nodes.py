"""Node entry points: build each role's objects from the experiment config and run them.

This is Acme's builder: roles know only their own configs and clients; the wiring
(addresses, run-directory layout) lives here. Every entry point takes
(config, run_dir, should_stop, **handles) and returns when done or told to stop.
"""
from collections.abc import Callable
import dataclasses
import logging
import os
import threading
import time

import jax
import numpy as np

from chorus import core
from chorus import models
from chorus import datasets
from chorus.actors import rollouts
from chorus.actors.actor import Actor
from chorus.actors.evaluation import evaluate
from chorus.datasets import EpisodeLogger
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server
from chorus.launch.experiment import ExperimentConfig
from chorus.learners import bond_learner
from chorus.learners import cfg_distill_learner
from chorus.learners import learner as learner_lib
from chorus.learners import loop
from chorus.learners import nash_md_learner
from chorus.learners import preference
from chorus.learners import soft_q_learner
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


def reward_model_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'reward_model')


def demonstrations_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'demonstrations')


def training_dataset(config: ExperimentConfig, run_dir: str) -> str:
  """The dataset an offline learner reads: the configured one, or recorded demonstrations."""
  return config.replay_dataset or demonstrations_dir(run_dir)


# Served model names beside 'policy'.
REFERENCE_MODEL = 'reference'  # the frozen warm start: KL reference, Nash-MD's mixture
ANCHOR_MODEL = 'anchor'        # BOND's moving anchor, pushed by the learner
REWARD_MODEL = 'reward'        # a learned reward model (BOND)
PREFERENCE_MODEL = 'preference'  # a learned pairwise preference model (Nash-MD)


def learned_model_name(config: ExperimentConfig) -> str | None:
  """The served learned reward or preference model of this config, if any."""
  if config.reward_model.kind != 'learned':
    return None
  return PREFERENCE_MODEL if config.algorithm == 'nash_md' else REWARD_MODEL


def _initial_params(config: ExperimentConfig):
  return models.init_params(config.model, jax.random.PRNGKey(config.seed))


def _warm_start_params(config: ExperimentConfig, run_dir: str):
  return Checkpointer(warm_start_dir(run_dir)).restore(_initial_params(config))


def demonstrations(config: ExperimentConfig, task, seed_offset: int = 7):
  """Endless Trajectory of the task's demonstrations (behaviour log-probs unknown: 0)."""
  rng = np.random.default_rng([config.seed, seed_offset])
  episode_id = 0
  while True:
    prompt = task.train_prompt(rng)
    completion = task.demonstration(prompt, rng)
    yield core.Trajectory(
        prompt_tokens=np.asarray(task.demonstration_prompt_tokens(prompt, rng), np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=np.zeros(len(completion), np.float32),
        reward=task.reward(prompt, completion), terminated=True, param_version=0,
        temperature=0.0, model_name='demonstrator', prompt_id=prompt.prompt_id,
        episode_id=episode_id, task=task.name, seed=config.seed,
        reward_components=task.reward_components(prompt, completion))
    episode_id += 1


def demonstration_batches(config: ExperimentConfig, task, batch_size: int):
  """Endless TrajectoryBatch of the task's demonstrations."""
  source = demonstrations(config, task)
  while True:
    yield core.batch_trajectories([next(source) for _ in range(batch_size)],
                                  config.sequence.prompt_len,
                                  config.sequence.completion_len)


def warm_start(config: ExperimentConfig, run_dir: str, should_stop: StopFn):
  """Supervised warm start on demonstrations; its params are version 0 and the reference.

  The demonstrations are the task's own, or the episodes of `warm_start.dataset` (RLDS).
  """
  metrics = MetricsWriter(metrics_path(run_dir), 'warm_start')
  if config.warm_start.dataset:
    batches = datasets.trajectory_batches(
        config.warm_start.dataset, config.warm_start.batch_size, config.sequence.prompt_len,
        config.sequence.completion_len, seed=config.seed)
  else:
    batches = demonstration_batches(config, config.make_task(), config.warm_start.batch_size)
  start = time.monotonic()
  params, history = supervised.warm_start(config.model, config.warm_start, batches,
                                          _initial_params(config))
  for record in history[::max(1, len(history) // 20)] + history[-1:]:
    metrics.write(kind='warm_start', **record)
  Checkpointer(warm_start_dir(run_dir)).save(0, params)
  logging.info('Warm start: %d steps in %.1f s, final nll %.3f', config.warm_start.steps,
               time.monotonic() - start, history[-1]['nll'] if history else float('nan'))


def reward_model(config: ExperimentConfig, run_dir: str, should_stop: StopFn):
  """Trains the learned reward (BOND) or preference (Nash-MD) model on noisy task pairs."""
  metrics = MetricsWriter(metrics_path(run_dir), 'reward_model')
  task = config.make_task()
  name = learned_model_name(config)
  train, accuracy = ((preference.train_preference_model, preference.preference_model_accuracy)
                     if name == PREFERENCE_MODEL else
                     (preference.train_reward_model, preference.reward_model_accuracy))
  start = time.monotonic()
  rng = np.random.default_rng([config.seed, config.reward_model.seed, 11])
  pairs = preference.preference_batches(task, rng, config.reward_model.batch_size,
                                        config.sequence.prompt_len,
                                        config.sequence.completion_len,
                                        num_pairs=config.reward_model.num_pairs)
  params, history = train(config.model, config.reward_model, pairs)
  for record in history[::max(1, len(history) // 20)] + history[-1:]:
    metrics.write(kind='reward_model', model=name, **record)
  held_out = accuracy(config.model, params, task, np.random.default_rng([config.seed, 12]),
                      config.sequence.prompt_len, config.sequence.completion_len)
  metrics.write(kind='reward_model_eval', model=name, **held_out)
  Checkpointer(reward_model_dir(run_dir)).save(0, params)
  logging.info('%s model: %d steps in %.1f s, held-out %s', name, config.reward_model.steps,
               time.monotonic() - start, held_out)


def demonstrations_dataset(config: ExperimentConfig, run_dir: str, should_stop: StopFn):
  """Records `num_demonstrations` of the task's demonstrations as an RLDS dataset."""
  source = demonstrations(config, config.make_task(), seed_offset=13)
  with EpisodeLogger(os.path.join(demonstrations_dir(run_dir), 'demonstrator_000'),
                     max_episodes_per_file=config.rlds_episodes_per_file) as episode_logger:
    for _ in range(config.num_demonstrations):
      if should_stop():
        return
      episode_logger.write(next(source))
  logging.info('Recorded %d demonstrations in %s', config.num_demonstrations,
               demonstrations_dir(run_dir))


def replay(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, port: int,
           host: str = '127.0.0.1'):
  del run_dir, host  # Reverb 0.14 cannot bind to one address (see replay/tables.py).
  replay_config = config.replay
  if config.replay_dataset:
    # Offline, inserts stop once the dataset is in: a sample-to-insert ratio would then
    # block the learner for good.
    replay_config = dataclasses.replace(replay_config, samples_per_insert=0.0)
  tables.serve(replay_config, config.sequence.prompt_len, config.sequence.completion_len,
               port, should_stop)


def _served_models(config: ExperimentConfig, run_dir: str) -> dict[str, ServedModel]:
  """The policy, the frozen reference, and what the algorithm adds (anchor, learned model)."""
  warm_start_params = _warm_start_params(config, run_dir)
  kinds = {'policy': 'decoder', REFERENCE_MODEL: 'decoder'}
  params = {'policy': warm_start_params, REFERENCE_MODEL: warm_start_params}
  if config.algorithm == 'bond':
    kinds[ANCHOR_MODEL], params[ANCHOR_MODEL] = 'decoder', warm_start_params
  learned = learned_model_name(config)
  if learned:
    kinds[learned] = 'preference' if learned == PREFERENCE_MODEL else 'reward'
    params[learned] = Checkpointer(reward_model_dir(run_dir)).restore(_initial_params(config))
  return {name: ServedModel(name, config.model, params[name], version=0,
                            config=config.inference, sequence=config.sequence, kind=kinds[name])
          for name in kinds}


def inference_server(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
                     server_index: int, port: int, host: str = '127.0.0.1',
                     status_every_s: float = 5.0):
  served = _served_models(config, run_dir)
  for name, model in served.items():
    # Decoders that the actors score completions with compile their scorer now too.
    model.warm_up(scoring=(name in (REFERENCE_MODEL, ANCHOR_MODEL)
                           and config.algorithm in ('bond', 'nash_md')) or None)
  mixtures = [('policy', REFERENCE_MODEL)] if config.algorithm == 'nash_md' else []
  # Music runs evaluate the frozen reference with classifier-free guidance (the CFG teacher).
  guided = [REFERENCE_MODEL] if config.guided_task else []
  grpc_server, _ = start_server(served, f'{host}:{port}', config.inference.num_threads,
                                mixtures=mixtures, guided=guided)
  logging.info('Inference server on %s:%d serving %s', host, port, sorted(served))
  metrics = MetricsWriter(metrics_path(run_dir), f'inference_server_{server_index}')
  while not should_stop():
    time.sleep(status_every_s)
    for name, model in served.items():
      metrics.write(kind='inference', model=name, param_version=model.param_version,
                    **model.counters_snapshot())
  grpc_server.stop(grace=2).wait()
  for model in served.values():
    model.close()


def _make_rollout(config: ExperimentConfig, client: InferenceClient):
  """What the actors of `config.algorithm` ask the inference server for."""
  task = config.make_task()
  if config.algorithm == 'bond':
    return rollouts.BestOfAnchorRollout(
        client, task, config.actor, anchor_model=ANCHOR_MODEL,
        num_anchor_samples=config.bond.num_anchor_samples,
        reward_model=learned_model_name(config))
  if config.algorithm == 'nash_md':
    return rollouts.MixtureOpponentRollout(
        client, task, config.actor, reference_model=REFERENCE_MODEL,
        mixture_coef=config.nash_md.mixture_coef, preference_model=learned_model_name(config),
        preference_temperature=config.nash_md.preference_temperature)
  if config.algorithm == 'cfg_distill':
    return rollouts.DiversityPairRollout(client, task, config.actor)
  return rollouts.PolicyRollout(client, task, config.actor)


def dataset_replayer(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
                     replay_addresses: list[str]):
  """Offline RL: writes a recorded dataset into the replay tables instead of actors."""
  paths = training_dataset(config, run_dir)
  count = datasets.fill_replay(paths, replay_addresses, config.replay.table,
                               config.sequence.prompt_len, config.sequence.completion_len,
                               should_stop=should_stop)
  logging.info('Replayed %d recorded episodes from %s', count, paths)
  MetricsWriter(metrics_path(run_dir), 'dataset_replayer').write(kind='dataset_replay',
                                                                 episodes=count)
  while not should_stop():  # Workers live until the run ends.
    time.sleep(0.5)


def actor(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, actor_ids: list[int],
          inference_address: str, replay_address: str):
  """Runs one actor loop per id, each in its own thread with its own clients and RLDS shard."""
  client = InferenceClient(inference_address)
  client.wait_until_ready()
  rollout = _make_rollout(config, client)
  errors = []

  def run_one(actor_id: int):
    try:
      writer = TrajectoryWriter(replay_address, config.replay.table,
                                config.sequence.prompt_len, config.sequence.completion_len)
      with EpisodeLogger(rlds_dir(run_dir, actor_id),
                         max_episodes_per_file=config.rlds_episodes_per_file) as episode_logger:
        Actor(actor_id, config.actor, config.make_task(), rollout=rollout,
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


def make_learner(config: ExperimentConfig, reference_params) -> learner_lib.Learner:
  """The learner of `config.algorithm`, starting from (and regularised to) the warm start."""
  optimizer = learner_lib.make_optimizer(config.learner.learning_rate,
                                         config.learner.max_grad_norm)
  if config.algorithm == 'vtrace':
    return vtrace_learner.make_vtrace_learner(config.model, config.vtrace, params=reference_params,
                                              reference_params=reference_params,
                                              optimizer=optimizer)
  if config.algorithm == 'soft_q':
    return soft_q_learner.make_soft_q_learner(config.model, config.soft_q, params=reference_params,
                                              reference_params=reference_params,
                                              optimizer=optimizer)
  if config.algorithm == 'inverse_soft_q':
    return soft_q_learner.make_inverse_soft_q_learner(
        config.model, config.inverse_soft_q, params=reference_params, optimizer=optimizer)
  if config.algorithm == 'bond':
    return bond_learner.make_bond_learner(config.model, config.bond, params=reference_params,
                                          optimizer=optimizer)
  if config.algorithm == 'cfg_distill':
    return cfg_distill_learner.make_cfg_distill_learner(
        config.model, config.cfg_distill, params=reference_params,
        teacher_params=reference_params,
        unconditional_prompt=config.make_task().unconditional_prompt_tokens(),
        optimizer=optimizer)
  return nash_md_learner.make_nash_md_learner(config.model, config.nash_md,
                                              params=reference_params, optimizer=optimizer)


def _training_batches(config: ExperimentConfig, run_dir: str, replay_addresses: list[str]):
  prompt_len, completion_len = config.sequence.prompt_len, config.sequence.completion_len
  if config.algorithm == 'inverse_soft_q':  # Demonstrations straight from RLDS, no Reverb.
    return datasets.trajectory_batches(training_dataset(config, run_dir), config.learner.batch_size,
                                       prompt_len, completion_len, seed=config.seed)
  return dataset.batch_iterator(replay_addresses, config.replay.table, config.learner.batch_size,
                                prompt_len, completion_len)


def learner(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
            inference_addresses: list[str], replay_addresses: list[str]):
  learner_obj = make_learner(config, _warm_start_params(config, run_dir))
  checkpointer = Checkpointer(learner_checkpoint_dir(run_dir))
  publishers = {(address, name): ParameterPublisher(address, model=name)
                for address in inference_addresses for name in learner_obj.published_params()}
  for publisher in publishers.values():
    publisher.wait_until_ready()
  if checkpointer.latest_step() is not None:  # Resume after a crash or restart.
    learner_obj.state = checkpointer.restore(learner_obj.state)
    logging.info('Learner resumed at step %d', learner_obj.step)

  def publish(models_to_publish: dict, version: int, resume: bool = False) -> float:
    return sum(publishers[address, name].publish(params, version, resume=resume)
               for address in inference_addresses for name, params in models_to_publish.items())

  # A restarted learner may be behind what the servers serve (steps after its checkpoint,
  # or every step if it crashed before the first one): put its own version back.
  publish(learner_obj.published_params(), learner_obj.step, resume=True)
  loop.run_learner(learner_obj, _training_batches(config, run_dir, replay_addresses),
                   config.learner, publish=publish, checkpoint=checkpointer.save,
                   metrics=MetricsWriter(metrics_path(run_dir), 'learner'),
                   tensorboard_dir=tensorboard_dir(run_dir), should_stop=should_stop)
  checkpointer.close()


ENTRY_POINTS = {
    'warm_start': warm_start,
    'reward_model': reward_model,
    'demonstrations': demonstrations_dataset,
    'dataset_replayer': dataset_replayer,
    'replay': replay,
    'inference_server': inference_server,
    'actor': actor,
    'evaluator': evaluator,
    'learner': learner,
}
