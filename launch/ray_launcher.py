"""Ray launcher: the same program on a Ray cluster, one Ray actor per node.

Each node gets a small host actor (`ray_node_host.NodeHost`) that holds the node's Ray
resources (accelerator machines for inference servers and the learner, CPU machines for
the others) and runs `python -m chorus.launch.worker RUN_DIR NODE` as its child process,
exactly as the local launcher does, with stdout and stderr in RUN_DIR/logs/NODE.log.

Restarts: a node whose process exits is re-run by `poll()` on the same host actor (same
machine, same port); a host actor that dies with its machine or process is restarted by
Ray (`max_restarts`), possibly elsewhere, and `poll()` then re-runs the node on it. Both
count in `restarts` and share the limit `max_restarts`.

The run directory must be at the same path on every Ray node and the driver (shared
storage): nodes read their specs there and write logs, metrics, checkpoints and RLDS
there. See docs/cluster.md.
"""
from collections.abc import Callable
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import threading
import time

import ray
from ray._private import ray_constants

from chorus.inference_server import auth
from chorus.launch import local as local_lib
from chorus.launch import program as program_lib
from chorus.launch import ray_node_host
from chorus.launch.launcher_config import LauncherConfig
from chorus.launch.local import NodeFailed

# Nothing large goes through Ray's object store: only exit codes and placements.
_LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
DEFAULT_CPU_RESOURCES = {'CPU': 1}
# Where to change the requests, for error messages.
_ACCELERATOR_SETTING = '--set launcher.ray_accelerator_resources'
_CPU_SETTING = '--set launcher.ray_cpu_resources'


def check_resources(resources: dict[str, float], setting: str) -> dict[str, float]:
  """`resources` if it maps resource names to non-negative numbers; else a ValueError."""
  if not isinstance(resources, dict) or not all(
      isinstance(name, str) and isinstance(amount, (int, float)) and amount >= 0
      for name, amount in resources.items()):
    raise ValueError(f'{setting}={resources!r} must map Ray resource names to non-negative '
                     'amounts, e.g. \'{"GPU": 1}\' or \'{"accelerator": 1, "CPU": 2}\'.')
  return dict(resources)


def _actor_options(resources: dict[str, float]) -> dict:
  """Ray actor options asking for `resources`; CPUs are 0 unless asked for.

  Ray's default for an actor (one CPU to be placed) would keep accelerator nodes off
  machines that have accelerators but no spare CPU slot.
  """
  custom = dict(resources)
  return dict(num_cpus=custom.pop('CPU', 0), num_gpus=custom.pop('GPU', 0), resources=custom)


def _is_loopback(address: str) -> bool:
  host = address.rsplit(':', 1)[0].strip('[]')
  try:
    return host == 'localhost' or ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


@contextlib.contextmanager
def _ray_single_machine_mode():
  """Keeps 127.0.0.1 as 127.0.0.1 while `ray.init` runs.

  On Linux Ray replaces a loopback address by the machine's network address
  (services.resolve_ip_for_localhost), which a cluster bound to loopback does not listen
  on; its single-machine mode (the default on macOS and Windows, otherwise set only by
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported) keeps loopback.
  """
  saved = ray_constants.ENABLE_RAY_CLUSTER
  ray_constants.ENABLE_RAY_CLUSTER = False
  try:
    yield
  finally:
    ray_constants.ENABLE_RAY_CLUSTER = saved


def _init_ray(address: str | None, local_num_cpus: int):
  """Connects this driver to the Ray cluster at `address`, or starts Ray on this machine.

  Ray's own instance gets `local_num_cpus` logical CPUs: placement slots, not cores.
  """
  # ray.init installs a SIGTERM handler that exits the driver at once; the caller's
  # (run.py: a clean stop of every node) must stay.
  sigterm_handler = signal.getsignal(signal.SIGTERM)
  # The terminal shows the run's progress; node output is in the run's logs.
  if address is None:
    with _ray_single_machine_mode():
      ray.init(address='local', _node_ip_address='127.0.0.1', include_dashboard=False,
               num_cpus=local_num_cpus, object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
               log_to_driver=False)
  elif _is_loopback(address):
    with _ray_single_machine_mode():
      ray.init(address=address, log_to_driver=False)
  else:
    ray.init(address=address, log_to_driver=False)
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, sigterm_handler)


def _cluster_resources() -> dict[str, float]:
  """The cluster's total resources, without Ray's per-node markers ('node:IP')."""
  return {name: amount for name, amount in ray.cluster_resources().items()
          if not name.startswith('node:')}


@dataclasses.dataclass
class _Running:
  """A node's host and where its supervision stands.

  A restart goes: failure seen (`exit_ref` None) -> backoff until `restart_at` ->
  `host_ready_ref` answers (Ray has restarted a lost host) -> a new `exit_ref`.
  """
  node: program_lib.Node
  host: ray.actor.ActorHandle
  exit_ref: ray.ObjectRef | None = None
  host_ready_ref: ray.ObjectRef | None = None
  restarts: int = 0
  restart_at: float | None = None
  last_failure: str = ''


class RayLauncher(local_lib.LauncherBase):
  """Starts, watches and stops the nodes of one program as Ray actors.

  Args:
    run_dir: the run directory (holds config.json; logs/ and nodes/ are made here); on
      storage that every Ray node sees at this same path.
    config: restarts, stop timeout and the Ray resource requests (`launcher.*` of the
      experiment config).
    address: the Ray cluster, e.g. "10.0.0.5:6379"; default RAY_ADDRESS, else a new Ray
      instance on this machine, bound to 127.0.0.1.
    num_nodes: how many nodes of the program run at once; a Ray instance started here
      gets at least that many logical CPUs (`config.ray_local_num_cpus` overrides).
  """

  def __init__(self, run_dir: str, config: LauncherConfig = LauncherConfig(), *,
               address: str | None = None, num_nodes: int = 1):
    super().__init__(run_dir, config)
    self.cpu_resources = check_resources(config.ray_cpu_resources or DEFAULT_CPU_RESOURCES,
                                         _CPU_SETTING)
    self.placement_timeout_s = config.ray_placement_timeout_s
    # A driver already connected to Ray (a notebook, a test) keeps its connection.
    self._owns_ray_connection = not ray.is_initialized()
    address = address or os.environ.get('RAY_ADDRESS')
    if self._owns_ray_connection:
      _init_ray(address, config.ray_local_num_cpus or max(os.cpu_count() or 1, num_nodes))
    # Ray only on this machine, started here: no autoscaler will ever add resources.
    self._single_machine = self._owns_ray_connection and address is None
    self.accelerator_resources = check_resources(
        config.ray_accelerator_resources or self._default_accelerator_resources(),
        _ACCELERATOR_SETTING)
    self._check_resources_exist()

  @staticmethod
  def _default_accelerator_resources() -> dict[str, float]:
    """A GPU where the cluster has GPUs; else a CPU slot (a machine without accelerators)."""
    return {'GPU': 1} if _cluster_resources().get('GPU', 0) >= 1 else {'CPU': 1}

  def _check_resources_exist(self):
    """Fails early where nodes ask for a resource that no Ray node has enough of."""
    cluster = _cluster_resources()
    for what, resources, setting in (
        ('accelerator', self.accelerator_resources, _ACCELERATOR_SETTING),
        ('CPU', self.cpu_resources, _CPU_SETTING)):
      if all(cluster.get(name, 0) >= amount for name, amount in resources.items()):
        continue
      message = (f'{what} nodes each ask Ray for {resources}, more than the whole cluster '
                 f'has: {cluster}. Ask for resources it has, e.g. '
                 f'{setting}=\'{{"CPU": 1}}\', or add machines that have them.')
      if self._single_machine:
        self.close()
        raise ValueError(message)
      logging.warning('%s Waiting up to %.0f s for an autoscaler to add them.',
                      message, self.placement_timeout_s)

  def _resources(self, node: program_lib.Node) -> dict[str, float]:
    return self.accelerator_resources if node.accelerator else self.cpu_resources

  def _address_ip(self, node: program_lib.Node) -> str | None:
    return self.addresses[node.name].rsplit(':', 1)[0] if node.serves else None

  def _check_fits(self, nodes: list[program_lib.Node]):
    """On Ray of this machine alone, fails at once where nodes would wait forever."""
    demand = {}
    for node in nodes + [running.node for running in self._running.values()]:
      for name, amount in self._resources(node).items():
        demand[name] = demand.get(name, 0) + amount
    cluster = _cluster_resources()
    if any(amount > cluster.get(name, 0) + 1e-9 for name, amount in demand.items()):
      raise NodeFailed(
          f'Nodes {[node.name for node in nodes]} and those running need {demand} in all, '
          f'more than the Ray instance of this machine has ({cluster}). Ask for less with '
          f'{_CPU_SETTING} and {_ACCELERATOR_SETTING} (e.g. \'{{"CPU": 0.25}}\'), give it '
          'more slots with --set launcher.ray_local_num_cpus=N, or use the local launcher.')

  def start(self, nodes: list[program_lib.Node]):
    """Places every node's host actor, gives serving nodes addresses, then runs the nodes."""
    if self._single_machine:
      self._check_fits(nodes)
    hosts = {}
    for node in nodes:
      hosts[node.name] = ray_node_host.NodeHost.options(
          max_restarts=self.max_restarts if node.restart else 0,
          **_actor_options(self._resources(node))).remote(
              self.run_dir, node.name, auth.run_secret(), stop_timeout_s=self.stop_timeout_s)
    places = {node.name: hosts[node.name].place.remote(node.serves) for node in nodes}
    _, unplaced = ray.wait(list(places.values()), num_returns=len(places),
                           timeout=self.placement_timeout_s)
    if unplaced:
      names = [node.name for node in nodes if places[node.name] in unplaced]
      for host in hosts.values():
        ray.kill(host, no_restart=True)
      raise NodeFailed(
          f'Ray placed no host for nodes {names} within {self.placement_timeout_s:.0f} s; they '
          f'ask for {[self._resources(n) for n in nodes if n.name in names]} and the cluster '
          f'has {ray.available_resources()} free of {ray.cluster_resources()}. Add machines '
          f'with those resources or change {_ACCELERATOR_SETTING} / {_CPU_SETTING}.')
    for node in nodes:
      placement = ray.get(places[node.name])
      if node.serves and node.name not in self.addresses:
        self.addresses[node.name] = f'{placement["ip"]}:{placement["port"]}'
    for node in nodes:
      local_lib.write_node_spec(self.run_dir, node, self.addresses)
      running = _Running(node, hosts[node.name])
      running.exit_ref = running.host.run.remote(self._address_ip(node))
      self._running[node.name] = running

  def run_to_completion(self, node: program_lib.Node, should_stop: Callable[[], bool]):
    """Runs a setup node and waits for it; raises NodeFailed if it fails."""
    self.start([node])
    running = self._running[node.name]
    while not ray.wait([running.exit_ref], timeout=0.2)[0]:
      if should_stop():
        return
    failure = self._failure(running)
    if failure:
      raise NodeFailed(f'Node {node.name} {failure}; its log {self.log_path(node.name)} ends '
                       f'with:\n{local_lib.log_tail(self.log_path(node.name))}')
    ray.kill(running.host, no_restart=True)
    del self._running[node.name]

  def _failure(self, running: _Running) -> str:
    """'' if the node's process exited 0, else what went wrong (its run must have ended)."""
    try:
      code = ray.get(running.exit_ref)
    except ray.exceptions.RayActorError as error:
      return f'lost its Ray actor ({type(error).__name__}: {error})'
    except ray.exceptions.RayTaskError as error:
      raise NodeFailed(f'Host of node {running.node.name} failed: {error}') from error
    return '' if code == 0 else f'exited with code {code}'

  def poll(self) -> bool:
    """Supervises once: restarts crashed restartable nodes, fails on the others.

    Returns True while a main node runs (or there is none) and False once every main node
    (each process of the learner) has exited 0.
    """
    now = time.monotonic()
    mains, mains_done = 0, 0
    for name, running in list(self._running.items()):
      mains += running.node.kind == program_lib.MAIN
      if running.restart_at is not None:
        if now >= running.restart_at:
          running.restart_at = None
          running.host_ready_ref = running.host.place.remote(serves=False)
        continue
      if running.host_ready_ref is not None:
        if ray.wait([running.host_ready_ref], timeout=0)[0]:
          self._rerun(running)
        continue
      if not ray.wait([running.exit_ref], timeout=0)[0]:
        continue
      failure = self._failure(running)
      if running.node.kind == program_lib.MAIN and not failure:
        mains_done += 1
        continue
      failure = failure or 'exited with code 0 before the run ended'
      log = self.log_path(name)
      if not running.node.restart:
        raise NodeFailed(f'Node {name} {failure}; its log {log} ends with:\n'
                         f'{local_lib.log_tail(log)}')
      if running.restarts >= self.max_restarts:
        raise NodeFailed(f'Node {name} failed {running.restarts + 1} times (last: it {failure}); '
                         f'see {log}:\n{local_lib.log_tail(log)}')
      running.exit_ref = None
      running.last_failure = failure
      running.restart_at = now + self.restart_backoff_s * 2**running.restarts
    return mains == 0 or mains_done < mains

  def _rerun(self, running: _Running):
    """Runs a failed node again once its host answers (Ray may have restarted it)."""
    name = running.node.name
    ready_ref, running.host_ready_ref = running.host_ready_ref, None
    try:
      ray.get(ready_ref)
    except ray.exceptions.RayActorError as error:
      raise NodeFailed(f'Ray could not bring back the host of node {name} after it '
                       f'{running.last_failure}: {error}') from error
    with open(self.log_path(name), 'a') as file:
      file.write(f'--- launcher: restarting {name} after it {running.last_failure}\n')
    running.exit_ref = running.host.run.remote(self._address_ip(running.node))
    running.restarts += 1
    self.restarts[name] = running.restarts

  def stop(self, kinds: tuple[str, ...] = program_lib.KINDS):
    """SIGTERM to the nodes of `kinds`, SIGKILL to those alive after the grace period.

    Their host actors are then killed, which gives their resources back to Ray.
    """
    targets = [r for r in self._running.values() if r.node.kind in kinds]
    waiting = [r for r in targets if r.exit_ref is not None]
    for running in targets:
      running.host.terminate.remote()
    if waiting:
      _, alive = ray.wait([r.exit_ref for r in waiting], num_returns=len(waiting),
                          timeout=self.stop_timeout_s)
      if alive:
        killed = [r for r in waiting if r.exit_ref in alive]
        ray.wait([r.host.kill.remote() for r in killed], num_returns=len(killed),
                 timeout=self.stop_timeout_s)
        ray.wait(alive, num_returns=len(alive), timeout=self.stop_timeout_s)
    for running in targets:
      ray.kill(running.host, no_restart=True)
      del self._running[running.node.name]

  def close(self):
    """Stops every node left (program.STOP_ORDER), then leaves Ray (ending a Ray instance
    this launcher started)."""
    super().close()
    if self._owns_ray_connection and ray.is_initialized():
      ray.shutdown()


