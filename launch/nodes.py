"""Node entry points: build each role's objects from the experiment config and run them.

Every entry point takes (config, run_dir, should_stop, **handles) and returns when done
or told to stop. What is particular to the agent comes from its builder
(agents/): the models served, the setup steps, the rollout, the learner, the data.
"""
from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import logging
import threading
import time

import jax

from chorus import agents
from chorus import datasets
from chorus import models
from chorus import replay as replay_lib
from chorus.actors import demonstrations
from chorus.actors.actor import Actor
from chorus.actors.evaluation import evaluate
from chorus.inference_server import auth
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server
from chorus.launch import processes
from chorus.launch import program as program_names
from chorus.launch import run_dir as layout
from chorus.launch.experiment import ExperimentConfig
from chorus.learners import background
from chorus.learners import distributed
from chorus.learners import learner as learner_lib
from chorus.learners import loop
from chorus.learners import supervised
from chorus.metrics import MetricsWriter
from chorus.models import lora
from chorus.models import sharding
from chorus.models.checkpoints import Checkpointer
from chorus.models.checkpoints import SubprocessCheckpointer

StopFn = Callable[[], bool]


def _param_shapes(model: models.DecoderConfig):
  """The parameter tree of `model` as shapes: a restore template, nothing allocated."""
  return jax.eval_shape(lambda rng: models.init_params(model, rng), jax.random.PRNGKey(0))


def warm_start_params(config: ExperimentConfig, run_dir: str):
  """The warm start's policy parameters (version 0, the reference), without adapters."""
  return Checkpointer(layout.warm_start_dir(run_dir)).restore(
      _param_shapes(config.model.base_decoder_config()))


def warm_start(config: ExperimentConfig, run_dir: str, should_stop: StopFn):
  """Supervised warm start on demonstrations; its params are version 0 and the reference.

  The demonstrations are the task's own, or the episodes of `warm_start.dataset` (RLDS);
  training starts from `warm_start.init` when it names a checkpoint.
  """
  del should_stop  # Minutes at most; a stop during it kills the process.
  metrics = MetricsWriter(layout.metrics_path(run_dir), 'warm_start')
  task = config.make_task()
  if not config.warm_start.dataset and not getattr(task, 'has_demonstrations', True):
    # RL starts from the initial (or pretrained) model, which is also the reference.
    logging.info('The task has no demonstrations: warm start skipped.')
    config = dataclasses.replace(config,
                                 warm_start=dataclasses.replace(config.warm_start, steps=0))
  if config.warm_start.dataset:
    batches = datasets.trajectory_batches(config.warm_start.dataset, config.warm_start.batch_size,
                                          config.sequence, seed=config.seed,
                                          skip_corrupt=config.skip_corrupt)
  else:
    batches = demonstrations.demonstration_batches(task, config.seed,
                                                   config.warm_start.batch_size, config.sequence)
  start = time.monotonic()
  if config.warm_start.init:
    initial_params = Checkpointer(config.warm_start.init).restore(
        _param_shapes(config.model.base_decoder_config()))
  else:
    initial_params = config.model.initial_params(jax.random.PRNGKey(config.seed))
  params, history = supervised.warm_start(config.model.base_decoder_config(), config.warm_start,
                                          batches, initial_params)
  metrics.write_history(history, kind='warm_start')
  Checkpointer(layout.warm_start_dir(run_dir)).save(0, params)
  logging.info('Warm start: %d steps in %.1f s, final nll %.3f', config.warm_start.steps,
               time.monotonic() - start, history[-1]['nll'] if history else float('nan'))


def setup(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, step: str):
  """Runs the agent's setup step `step` (see AgentBuilder.setup_steps)."""
  steps = {s.name: s for s in config.builder().setup_steps(config.replay_dataset)}
  if step not in steps:
    raise ValueError(f'The agent has no setup step {step!r}; its steps: {sorted(steps)}.')
  context = agents.SetupContext(
      run_dir=run_dir, task=config.make_task(), model=config.model.base_decoder_config(),
      sequence=config.sequence,
      seed=config.seed, metrics=MetricsWriter(layout.metrics_path(run_dir), step),
      should_stop=should_stop, rlds_episodes_per_file=config.rlds_episodes_per_file)
  steps[step].run(context)


def replay(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, server_index: int,
           port: int, host: str = '127.0.0.1'):
  del host  # Reverb 0.14 cannot bind to one address (see replay/tables.py).
  replay_config = config.replay
  if config.builder().data(config.replay_dataset).source == agents.DataSource.DATASET_IN_REPLAY:
    # Inserts stop once the dataset is in: a sample-to-insert ratio would then block the
    # learner for good.
    replay_config = dataclasses.replace(replay_config, samples_per_insert=0.0)
  name = program_names.replay_server_name(server_index)
  replay_lib.serve(replay_config, config.builder().schema(), config.sequence, port,
                   should_stop, checkpoint_dir=layout.replay_checkpoint_dir(run_dir, name),
                   metrics=MetricsWriter(layout.metrics_path(run_dir), name))


def _served_models(config: ExperimentConfig, run_dir: str) -> dict[str, ServedModel]:
  """The policy and the frozen reference (the warm start), and what the agent adds.

  Only the policy and the models the agent publishes take pushes; the reference and the
  agent's other models (learned reward and preference models) are read-only once built.
  """
  warm_params = warm_start_params(config, run_dir)
  policy_model = config.model.base_decoder_config()
  mesh = sharding.make_mesh(config.mesh)

  def serve(name, params, model=policy_model, kind='decoder', accepts_pushes=False,
            pooling='last'):
    # Served without adapters: the models the learner moves get its adapters in each push
    # (when it trains adapters) and merge them into these weights.
    adapters = config.model.lora if accepts_pushes else models.LoraConfig()
    return ServedModel(name, model, params, version=0, config=config.inference,
                       sequence=config.sequence, kind=kind, accepts_pushes=accepts_pushes,
                       pooling=pooling, pushed_adapters=adapters, mesh=mesh)

  served = {agents.POLICY_MODEL: serve(agents.POLICY_MODEL, warm_params, accepts_pushes=True),
            agents.REFERENCE_MODEL: serve(agents.REFERENCE_MODEL, warm_params)}
  for spec in config.builder().served_models(policy_model):
    model = spec.model or policy_model
    params = warm_params
    if spec.checkpoint is not None:  # Trained by a setup step.
      params = Checkpointer(f'{run_dir}/{spec.checkpoint}').restore(_param_shapes(model))
    served[spec.name] = serve(spec.name, params, model, spec.kind,
                              accepts_pushes=spec.published, pooling=spec.pooling)
  return served


def inference_server(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
                     server_index: int, port: int, host: str = '127.0.0.1',
                     status_every_s: float = 5.0):
  # Before the first computation: XLA:CPU sizes its thread pool from the affinity mask.
  cores = processes.use_cores(config.inference.cpu_cores, 'inference.cpu_cores', server_index)
  metrics = MetricsWriter(layout.metrics_path(run_dir), f'inference_server_{server_index}')
  metrics.write(kind='inference_server', cpu_cores=cores)
  builder = config.builder()
  served = _served_models(config, run_dir)
  scored = builder.scored_models()
  for name, model in served.items():
    # Decoders that the actors score completions with compile their scorer now too.
    model.warm_up(scoring=(name in scored) or None)
  # Tasks with an unconditional prompt (music) also evaluate the reference with guidance.
  guided = [agents.REFERENCE_MODEL] if config.guided_task else []
  grpc_server, _ = start_server(served, f'{host}:{port}', config.inference.num_threads,
                                mixtures=builder.mixtures(), guided=guided,
                                secret=auth.run_secret(), tls_dir=config.inference.tls_dir)
  logging.info('Inference server on %s:%d (%s) serving %s', host, port,
               'TLS' if config.inference.tls_dir else 'plaintext', sorted(served))
  while not should_stop():
    time.sleep(status_every_s)
    for name, model in served.items():
      metrics.write(kind='inference', model=name, param_version=model.param_version,
                    **model.counters_snapshot())
  grpc_server.stop(grace=2).wait()
  for model in served.values():
    model.close()


def dataset_replayer(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
                     replay_addresses: list[str]):
  """Offline RL: writes a recorded dataset into the replay tables instead of actors."""
  builder = config.builder()
  path = builder.data(config.replay_dataset).dataset_path(run_dir)
  count = datasets.fill_replay(path, replay_addresses, config.replay.table, builder.schema(),
                               config.sequence, skip_corrupt=config.skip_corrupt,
                               should_stop=should_stop)
  logging.info('Replayed %d recorded episodes from %s', count, path)
  MetricsWriter(layout.metrics_path(run_dir), 'dataset_replayer').write(kind='dataset_replay',
                                                                        episodes=count)
  while not should_stop():  # Workers live until the run ends.
    time.sleep(0.5)


@contextlib.contextmanager
def actor_loop(config: ExperimentConfig, run_dir: str, actor_id: int, rollout,
               replay_address: str) -> Iterator[Actor]:
  """One actor loop with its replay writer and RLDS directory, closed on exit."""
  schema = config.builder().schema()
  writer = replay_lib.TrajectoryWriter(replay_address, config.replay.table, schema,
                                       config.sequence)
  with datasets.EpisodeLogger(
      layout.rlds_dir(run_dir, actor_id), schema=schema,
      max_episodes_per_file=config.rlds_episodes_per_file) as episode_logger:
    yield Actor(actor_id, config.actor, config.make_task(), rollout=rollout,
                write_replay=writer.write, log_episode=episode_logger.write,
                metrics=MetricsWriter(layout.metrics_path(run_dir), f'actor_{actor_id}'),
                seed=config.seed)
  writer.close()


def actor(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *, actor_ids: list[int],
          inference_address: str, replay_address: str):
  """Runs one actor loop per id, each in its own thread with its own clients and RLDS shard."""
  client = InferenceClient(inference_address, tls_dir=config.inference.tls_dir)
  client.wait_until_ready()
  rollout = config.builder().make_rollout(client, config.make_task(), config.actor)
  errors = []

  def run_one(actor_id: int):
    try:
      with actor_loop(config, run_dir, actor_id, rollout, replay_address) as one_actor:
        one_actor.run(lambda: should_stop() or bool(errors))
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
  metrics = MetricsWriter(layout.metrics_path(run_dir), 'evaluator')
  task = config.make_task()
  with InferenceClient(inference_address, tls_dir=config.inference.tls_dir) as client:
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


def make_learner(config: ExperimentConfig, params, run_dir: str = '') -> learner_lib.Learner:
  """The agent's learner on this node's mesh, starting from (and regularised to) `params`.

  With `model.lora`, fresh adapters (the same function) are added to `params`: the learner
  then trains, checkpoints and pushes only them.
  """
  if config.model.lora.rank:
    params = lora.add_adapters(params, config.model.decoder_config(),
                               jax.random.PRNGKey(config.seed + 1))
  return config.builder().make_learner(agents.LearnerContext(
      model=config.model.decoder_config(), sequence=config.sequence, task=config.make_task(),
      params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(
          config.learner.learning_rate, config.learner.max_grad_norm,
          decay_steps=config.learner.max_steps if config.learner.learning_rate_decay else 0,
          warmup_steps=config.learner.learning_rate_warmup),
      mesh=sharding.make_mesh(config.mesh), run_dir=run_dir))


def _training_batches(config: ExperimentConfig, run_dir: str, replay_addresses: list[str],
                      process_index: int = 0):
  """This learner process's batches: its share of each batch's rows (all of them for one
  process), from replay or read from the dataset itself."""
  builder = config.builder()
  data = builder.data(config.replay_dataset)
  rows = config.learner.batch_size // config.learner.processes
  if data.source == agents.DataSource.DATASET:
    return datasets.trajectory_batches(data.dataset_path(run_dir), rows, config.sequence,
                                       schema=builder.schema(), seed=config.seed + process_index,
                                       skip_corrupt=config.skip_corrupt)
  return replay_lib.batch_iterator(replay_addresses, config.replay.table, rows, builder.schema(),
                                   config.sequence)


def learner(config: ExperimentConfig, run_dir: str, should_stop: StopFn, *,
            inference_addresses: list[str], replay_addresses: list[str], process_index: int = 0,
            coordinator: str | None = None, port: int | None = None, host: str = '127.0.0.1'):
  """One process of the learner (learners/distributed.py when there are several).

  Every process updates on its share of the rows and takes part in gathering what is
  published and checkpointed; process 0 alone pushes to the servers, logs and writes the
  checkpoints. Process 0 of several serves the coordination service at host:port.
  """
  own_address = f'{host}:{port}' if port else ''  # Process 0's service, with several.
  group = distributed.ProcessGroup(process_index, config.learner.processes,
                                   coordinator or own_address)
  distributed.initialize(group, bind_address=own_address)
  learner_obj = make_learner(config, warm_start_params(config, run_dir), run_dir)
  checkpoint_dir = layout.learner_checkpoint_dir(run_dir)
  # Resume after a crash or restart, from the newest checkpoint that restores.
  with contextlib.closing(Checkpointer(checkpoint_dir)) as reader:
    restored = reader.restore_newest(learner_obj.state)
  if restored is not None:
    learner_obj.restore(restored[1])
    logging.info('Learner resumed at step %d', learner_obj.step)
  # What a restarted learner pushes first (gathered by every process, like each push).
  resumed = learner_obj.published_params()
  if group.count > 1:
    resumed = distributed.gather_to_host(resumed)

  def stop_together() -> bool:  # Every process stops after the same step.
    return distributed.any_process(should_stop())

  if group.is_primary:
    _lead_learner(config, run_dir, stop_together, learner_obj, resumed, checkpoint_dir,
                  inference_addresses, replay_addresses)
  else:
    loop.run_learner(learner_obj, _training_batches(config, run_dir, replay_addresses,
                                                    process_index),
                     config.learner, publish=lambda models, _: distributed.gather_to_host(models),
                     checkpoint=lambda _, state: distributed.gather_to_host(state), metrics=None,
                     should_stop=stop_together)
  distributed.shutdown()


def _lead_learner(config: ExperimentConfig, run_dir: str, should_stop: StopFn,
                  learner_obj: learner_lib.Learner, resumed: dict, checkpoint_dir: str,
                  inference_addresses: list[str], replay_addresses: list[str]):
  """Process 0 of the learner (the only one of one): its loop, pushes and checkpoints."""
  publishers = {(address, name): ParameterPublisher(address, model=name,
                                                     tls_dir=config.inference.tls_dir)
                for address in inference_addresses for name in learner_obj.published_params()}
  for connection in publishers.values():
    connection.wait_until_ready()

  def push_to(address: str) -> Callable[[dict, int], None]:
    def push(models_to_publish: dict, version: int, resume: bool = False):
      for name, params in models_to_publish.items():
        publishers[address, name].publish(params, version, resume=resume)
    return push

  # A restarted learner may be behind what the servers serve (steps after its checkpoint,
  # or every step if it crashed before the first one): put its own version back.
  for address in inference_addresses:
    push_to(address)(resumed, learner_obj.step, resume=True)
  publisher = background.BackgroundPublisher(
      {address: push_to(address) for address in inference_addresses})
  if config.learner.processes == 1:
    # Device arrays go to the background publisher as they are: its thread reads them.
    publish = publisher.submit
    checkpointer = Checkpointer(checkpoint_dir)
  else:
    def publish(models: dict, version: int):
      publisher.submit(distributed.gather_to_host(models), version)

    checkpointer = SubprocessCheckpointer(checkpoint_dir)
  loop.run_learner(learner_obj, _training_batches(config, run_dir, replay_addresses),
                   config.learner, publish=publish,
                   checkpoint=lambda step, state: checkpointer.save(
                       step, distributed.gather_to_host(state)),
                   metrics=MetricsWriter(layout.metrics_path(run_dir), 'learner'),
                   tensorboard_dir=layout.tensorboard_dir(run_dir), should_stop=should_stop)
  publisher.flush()  # The servers serve the last version before the run's final evaluation.
  publisher.close()
  checkpointer.close()


# What a role imports on first use that takes seconds of CPU (TensorFlow, through Reverb
# and the RLDS files). The worker loads these before it marks the node started, so that
# cost accounting counts them as start-up; roles not named here run without TensorFlow.
SLOW_IMPORTS = {
    'replay': ('chorus.replay.tables',),
    'dataset_replayer': ('chorus.datasets.replay',),
    'actor': ('chorus.replay.writer', 'chorus.datasets.rlds_writer'),
    'learner': ('chorus.replay.dataset',),
}

ENTRY_POINTS = {
    'warm_start': warm_start,
    'setup': setup,
    'dataset_replayer': dataset_replayer,
    'replay': replay,
    'inference_server': inference_server,
    'actor': actor,
    'evaluator': evaluator,
    'learner': learner,
}
