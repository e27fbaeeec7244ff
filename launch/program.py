"""A program is plain data: nodes and the handles between them (Launchpad's idea).

Building a program starts nothing; a launcher (local processes, or Ray) decides where
each node runs, gives every serving node a port and turns `Address` handles into
"host:port" strings before the node starts.
"""
import dataclasses
from typing import Any

from chorus.launch.experiment import ExperimentConfig

# What a launcher does with a node:
SETUP = 'setup'      # runs to completion before anything else starts
SERVICE = 'service'  # started first, stopped last (replay, inference servers)
WORKER = 'worker'    # restarted if it crashes, stopped when the main node ends (actors)
MAIN = 'main'        # the run ends when it exits (the learner)
KINDS = (SETUP, SERVICE, WORKER, MAIN)


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
    serves: the node listens on a port, passed to it as `port`.
    resources: what the node needs (e.g. {'CPU': 1, 'GPU': 1}); used by cluster launchers.
  """
  name: str
  role: str
  kind: str
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  serves: bool = False
  resources: dict[str, float] = dataclasses.field(default_factory=lambda: {'CPU': 1})

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


def make_program(config: ExperimentConfig) -> list[Node]:
  """The SEED topology: warm start, replay, one inference server, actors, one learner."""
  nodes = [
      Node('warm_start', 'warm_start', SETUP),
      Node('replay', 'replay', SERVICE, serves=True),
      Node('inference_server', 'inference_server', SERVICE, serves=True),
  ]
  for actor_id in range(config.num_actors):
    nodes.append(Node(f'actor_{actor_id}', 'actor', WORKER,
                      kwargs=dict(actor_id=actor_id,
                                  inference_address=Address('inference_server'),
                                  replay_address=Address('replay'))))
  nodes.append(Node('learner', 'learner', MAIN,
                    kwargs=dict(inference_addresses=[Address('inference_server')],
                                replay_address=Address('replay'))))
  return nodes
