"""Local launcher: one OS process per node on this machine, supervised.

Nodes run `python -m chorus.launch.worker RUN_DIR NODE` in their own session (so a
terminal Ctrl-C reaches only the launcher, which then stops the tree in order), with
stdout and stderr in RUN_DIR/logs/NODE.log and PR_SET_PDEATHSIG set, so children die
with the launcher even if it is SIGKILLed.
"""
from collections.abc import Callable
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

from chorus.inference_server import auth
from chorus.launch import program as program_lib
from chorus.launch import worker
from chorus.launch.launcher_config import LauncherConfig
from chorus.launch.processes import die_with_parent


class NodeFailed(RuntimeError):
  """A node that must not fail (setup, service, main) exited with an error."""


def free_port(ip: str = '127.0.0.1') -> int:
  """A port free on `ip` now (the OS picks it; a tiny race remains until the node binds)."""
  with socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET) as sock:
    sock.bind((ip, 0))
    return sock.getsockname()[1]


def node_log_path(run_dir: str, name: str) -> str:
  return os.path.join(run_dir, 'logs', f'{name}.log')


def write_node_spec(run_dir: str, node: program_lib.Node, addresses: dict[str, str]):
  """RUN_DIR/nodes/NODE.json: the node's role and kwargs, handles resolved (worker.py reads it)."""
  kwargs = program_lib.resolve(dict(node.kwargs), addresses)
  if node.serves:
    host, port = addresses[node.name].rsplit(':', 1)
    kwargs.update(host=host, port=int(port))
  with open(worker.node_spec_path(run_dir, node.name), 'w') as file:
    json.dump({'role': node.role, 'kwargs': kwargs}, file, indent=2)


def start_worker(run_dir: str, name: str, log, secret: str | None = None) -> subprocess.Popen:
  """Starts `python -m chorus.launch.worker RUN_DIR NAME` with output to the open file `log`.

  The node gets its own session (signals to the launcher's process group do not reach
  it) and SIGTERM when its parent dies, even by SIGKILL. Its environment is this
  process's, with the run's secret (inference_server/auth.py) if `secret` is given.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
  if secret:
    env[auth.SECRET_ENV] = secret
  return subprocess.Popen(
      [sys.executable, '-m', 'chorus.launch.worker', run_dir, name],
      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
      start_new_session=True,
      # With the parent's pid: a parent killed between the fork and the prctl leaves no
      # orphan (it would run on, unsupervised, holding the node's port).
      preexec_fn=functools.partial(die_with_parent, os.getpid()))


def log_tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors='replace') as file:
      return ''.join(file.readlines()[-lines:])
  except OSError:
    return ''


@dataclasses.dataclass
class _Running:
  node: program_lib.Node
  process: subprocess.Popen
  restarts: int = 0
  restart_at: float | None = None


class LauncherBase:
  """What every launcher shares: the run directory, restart policy and ordered shutdown.

  Subclasses implement start, run_to_completion, poll and stop(kinds).

  Args:
    run_dir: the run directory (holds config.json; logs/ and nodes/ are made here).
    config: restart limit, backoff and stop timeout.
  """

  def __init__(self, run_dir: str, config: LauncherConfig = LauncherConfig()):
    self.run_dir = run_dir
    self.max_restarts = config.max_restarts
    self.restart_backoff_s = config.restart_backoff_s
    self.stop_timeout_s = config.stop_timeout_s
    self.addresses: dict[str, str] = {}
    self.restarts: dict[str, int] = {}
    self._running: dict = {}
    os.makedirs(os.path.join(run_dir, 'logs'), exist_ok=True)
    os.makedirs(os.path.join(run_dir, 'nodes'), exist_ok=True)

  def log_path(self, name: str) -> str:
    return node_log_path(self.run_dir, name)

  def stop(self, kinds: tuple[str, ...] = program_lib.KINDS):
    raise NotImplementedError

  def close(self):
    """Ends the run: stops every node left, kind by kind (program.STOP_ORDER)."""
    for kind in program_lib.STOP_ORDER:
      self.stop((kind,))


class LocalLauncher(LauncherBase):
  """Starts, watches and stops the nodes of one program as processes of this machine.

  Args: those of LauncherBase, and `host`, the address serving nodes bind to.
  """

  def __init__(self, run_dir: str, config: LauncherConfig = LauncherConfig(), *,
               host: str = '127.0.0.1'):
    super().__init__(run_dir, config)
    self.host = host

  @property
  def processes_path(self) -> str:
    """JSON lines {node, pid, time}, one per process started, restarts included."""
    return os.path.join(self.run_dir, 'nodes', 'processes.jsonl')

  def _spawn(self, node: program_lib.Node) -> subprocess.Popen:
    write_node_spec(self.run_dir, node, self.addresses)
    with open(self.log_path(node.name), 'ab') as log:
      process = start_worker(self.run_dir, node.name, log)
    with open(self.processes_path, 'a') as file:  # Lets users and tests account for every pid.
      file.write(json.dumps({'node': node.name, 'pid': process.pid, 'time': time.time()}) + '\n')
    return process

  def start(self, nodes: list[program_lib.Node]):
    for node in nodes:
      if node.serves and node.name not in self.addresses:
        self.addresses[node.name] = f'{self.host}:{free_port(self.host)}'
    for node in nodes:
      self._running[node.name] = _Running(node, self._spawn(node))

  def run_to_completion(self, node: program_lib.Node, should_stop: Callable[[], bool]):
    """Runs a setup node and waits for it; raises NodeFailed if it fails."""
    self.start([node])
    while self._running[node.name].process.poll() is None:
      if should_stop():
        return
      time.sleep(0.2)
    if self._running[node.name].process.returncode != 0:
      self._fail(node.name)
    del self._running[node.name]

  def _fail(self, name: str):
    raise NodeFailed(f'Node {name} exited with code {self._running[name].process.returncode}; '
                     f'its log {self.log_path(name)} ends with:\n{log_tail(self.log_path(name))}')

  def poll(self) -> bool:
    """Supervises once: restarts crashed restartable nodes, fails on the others.

    Returns True while a main node runs (or there is none) and False once every main node
    (each process of the learner) has exited 0.
    """
    now = time.monotonic()
    mains, mains_done = 0, 0
    for name, running in list(self._running.items()):
      mains += running.node.kind == program_lib.MAIN
      code = running.process.poll()
      if code is None:
        continue
      if running.node.kind == program_lib.MAIN and code == 0:
        mains_done += 1
        continue
      if not running.node.restart:
        self._fail(name)
      if running.restart_at is None:
        if running.restarts >= self.max_restarts:
          raise NodeFailed(f'Node {name} crashed {running.restarts + 1} times (last exit code '
                           f'{code}); see {self.log_path(name)}:\n{log_tail(self.log_path(name))}')
        running.restart_at = now + self.restart_backoff_s * 2**running.restarts
      elif now >= running.restart_at:
        with open(self.log_path(name), 'a') as file:
          file.write(f'--- launcher: restarting {name} after exit code {code}\n')
        running.process = self._spawn(running.node)
        running.restarts += 1
        running.restart_at = None
        self.restarts[name] = running.restarts
    return mains == 0 or mains_done < mains

  def stop(self, kinds: tuple[str, ...] = program_lib.KINDS):
    """SIGTERM to the nodes of `kinds`, SIGKILL to those still alive after the grace period."""
    targets = [r for r in self._running.values() if r.node.kind in kinds]
    for running in targets:
      if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + self.stop_timeout_s
    for running in targets:
      try:
        running.process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait()
    for running in targets:
      del self._running[running.node.name]
