"""A program is plain data: nodes and the handles between them (Launchpad's idea).

Building a program starts nothing; a launcher (local processes, or Ray) decides where
each node runs, gives every serving node a port and turns `Address` handles into
"host:port" strings before the node starts.
"""
import dataclasses
from typing import Any

from chorus.agents import DataSource
from chorus.launch.experiment import ExperimentConfig

# When a launcher starts and stops a node:
SETUP = 'setup'      # runs to completion before anything else starts (warm start)
SERVICE = 'service'  # started first, stopped last (replay, inference servers)
WORKER = 'worker'    # stopped when the main node ends (actors, evaluator)
MAIN = 'main'        # the run ends when it exits 0 (the learner)
KINDS = (SETUP, SERVICE, WORKER, MAIN)
# Stopping a run: the learner first (it may be waiting for data from the actors), then the
# actors (they may be waiting for the learner to make room in replay), then the services.
STOP_ORDER = (MAIN, WORKER, SERVICE, SETUP)


@dataclasses.dataclass(frozen=True)
class Address:
  """A handle to a serving node, resolved to "host:port" at launch."""
  node: str


@dataclasses.dataclass(frozen=True)
class Node:
  """One process: `role` names its entry point in launch/nodes.py.

  Attributes:
    name: unique within the program; also its log file's name.
    role: entry point name.
    kind: one of KINDS.
    kwargs: plain data and Address handles passed to the entry point.
    serves: the node listens on a port, passed to it as `port` (and `host` to bind).
    restart: a crashed node is restarted (with backoff); otherwise its crash ends the run.
    accelerator: the node wants an accelerator (inference servers, learner); cluster
      launchers place it on accelerator machines, actors on CPU machines.
  """
  name: str
  role: str
  kind: str
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  serves: bool = False
  restart: bool = False
  accelerator: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Node {self.name!r} has kind {self.kind!r}; use one of {KINDS}.')


def resolve(value, addresses: dict[str, str]):
  """Replaces Address handles (also inside lists and dicts) by their "host:port"."""
  if isinstance(value, Address):
    if value.node not in addresses:
      raise KeyError(f'No address for node {value.node!r}; is it a serving node of the program?')
    return addresses[value.node]
  if isinstance(value, list):
    return [resolve(item, addresses) for item in value]
  if isinstance(value, dict):
    return {key: resolve(item, addresses) for key, item in value.items()}
  return value


def max_nodes_at_once(program: list[Node]) -> int:
  """How many nodes run at the same time: setup nodes one by one, then all the others."""
  return max(1, sum(node.kind != SETUP for node in program))


def inference_server_name(index: int) -> str:
  return f'inference_server_{index}'


def replay_server_name(index: int) -> str:
  return f'replay_{index}'


def make_program(config: ExperimentConfig) -> list[Node]:
  """The SEED topology: setup, replay, inference servers, actors, evaluator, learner.

  Setup: the warm start (always: it also makes the reference), then the agent's setup
  steps (a reward model to train, demonstrations to record). Where the agent's data come
  from decides the rest: actors write to replay (actor processes each run
  `config.actors_per_process` actor loops, spread round-robin over the inference servers
  and the replay servers), or a dataset replayer fills replay once, or the learner reads
  a dataset itself (no replay servers). The learner publishes to every inference server
  and samples from every replay server (one process, or several: `learner_nodes`); a
  learner of one process restarts from its latest checkpoint, a
  restarted inference server serves the warm-start parameters until its next push, and a
  restarted replay server its tables' latest checkpoint.
  """
  builder = config.builder()
  data = builder.data(config.replay_dataset)
  servers = [inference_server_name(i) for i in range(config.num_inference_servers)]
  uses_replay = data.source != DataSource.DATASET
  replays = [replay_server_name(i) for i in range(config.num_replay_servers)] if uses_replay else []
  nodes = [Node('warm_start', 'warm_start', SETUP)]
  nodes += [Node(step.name, 'setup', SETUP, kwargs=dict(step=step.name),
                 accelerator=step.accelerator)
            for step in builder.setup_steps(config.replay_dataset)]
  # Replay restarts from its tables' newest checkpoint; the actors' and the learner's
  # Reverb clients reconnect to the same port.
  nodes += [Node(name, 'replay', SERVICE, kwargs=dict(server_index=index), serves=True,
                 restart=True) for index, name in enumerate(replays)]
  nodes += [Node(name, 'inference_server', SERVICE, kwargs=dict(server_index=index), serves=True,
                 restart=True, accelerator=True) for index, name in enumerate(servers)]
  if data.source == DataSource.ACTORS:
    per_process = config.actors_per_process
    for process_index, first in enumerate(range(0, config.num_actors, per_process)):
      actor_ids = list(range(first, min(first + per_process, config.num_actors)))
      nodes.append(Node(
          f'actors_{process_index}', 'actor', WORKER, restart=True,
          kwargs=dict(actor_ids=actor_ids,
                      inference_address=Address(servers[process_index % len(servers)]),
                      replay_address=Address(replays[process_index % len(replays)]))))
  elif data.source == DataSource.DATASET_IN_REPLAY:
    # Not restartable: a second pass would store every episode twice.
    nodes.append(Node('dataset_replayer', 'dataset_replayer', WORKER,
                      kwargs=dict(replay_addresses=[Address(name) for name in replays])))
  if config.evaluation.every_s > 0:
    nodes.append(Node('evaluator', 'evaluator', WORKER, restart=True,
                      kwargs=dict(inference_address=Address(servers[0]))))
  nodes += learner_nodes(config, servers, replays)
  return nodes


def learner_process_name(index: int) -> str:
  return 'learner' if index == 0 else f'learner_process_{index}'


def learner_nodes(config: ExperimentConfig, servers: list[str], replays: list[str]) -> list[Node]:
  """The learner: one node per process (`learner.processes`).

  With several, process 0 ('learner') serves JAX's coordination service on its port and
  the others join it; all are main nodes (the run ends when every one has exited 0), and
  none restarts (a process cannot rejoin a running `jax.distributed` group).
  """
  count = config.learner.processes
  handles = dict(inference_addresses=[Address(name) for name in servers],
                 replay_addresses=[Address(name) for name in replays])
  if count == 1:
    return [Node('learner', 'learner', MAIN, restart=True, accelerator=True, kwargs=handles)]
  return [Node(learner_process_name(index), 'learner', MAIN, accelerator=True,
               serves=index == 0,
               kwargs=dict(handles, process_index=index,
                           coordinator=Address(learner_process_name(0)) if index else None))
          for index in range(count)]
