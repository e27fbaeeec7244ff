"""The Ray actor that hosts one node of a program: `python -m chorus.launch.worker` as its child.

Running the node in a child rather than in the Ray worker keeps JAX, TensorFlow and gRPC
state out of the actor (a restarted node starts clean), puts the output of C++ libraries
in the node's log, and stops a node with SIGTERM the same way on both launchers.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import ray

from chorus.launch import local as local_lib
from chorus.launch import processes
from chorus.launch.local import NodeFailed


def placement_path(run_dir: str, node: str) -> str:
  """Where a node's host records the Ray node it last ran on and the node's pid."""
  return os.path.join(run_dir, 'nodes', f'{node}.ray.json')


def _is_running_node(pid: int, run_dir: str, name: str) -> bool:
  """Whether `pid` is alive and is the worker of node `name` of this run (not a reused pid)."""
  if not processes.is_alive(pid):
    return False
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as file:
      argv = file.read().split(b'\0')
  except OSError:
    return False
  return b'chorus.launch.worker' in argv and argv[-3:-1] == [run_dir.encode(), name.encode()]


@ray.remote(max_concurrency=2)
class NodeHost:
  """Runs one node's worker process on the Ray node this actor was placed on.

  Two calls run at once, so `terminate` and `kill` reach the process while `run` waits.
  """

  def __init__(self, run_dir: str, name: str, secret: str | None = None, *,
               stop_timeout_s: float):
    self._run_dir = run_dir
    self._name = name
    self._secret = secret  # The run's (auth.py): into the node's environment, nowhere else.
    self._stop_timeout_s = stop_timeout_s
    self._lock = threading.Lock()
    self._process: subprocess.Popen | None = None
    self._stopping = False

  def __repr__(self):  # Ray names the actor by this in its logs and `ray list actors`.
    return f'NodeHost({self._name})'

  @ray.method(max_task_retries=-1)
  def place(self, serves: bool) -> dict:
    """Where this actor runs; for a serving node also a port free on that machine.

    Ray retries this call while it restarts the actor, so an answer means the host is up.
    """
    context = ray.get_runtime_context()
    placement = dict(ray_node_id=context.get_node_id(), ip=ray.util.get_node_ip_address(),
                     hostname=socket.gethostname(), host_pid=os.getpid(),
                     accelerator_ids={kind: ids for kind, ids
                                      in context.get_accelerator_ids().items() if ids})
    if serves:
      placement['port'] = local_lib.free_port(placement['ip'])
    return placement

  def run(self, address_ip: str | None) -> int | None:
    """Runs the node (spec already in RUN_DIR/nodes) to its end; returns its exit code.

    Args:
      address_ip: for a serving node, the IP in the address its clients were given; a
        host that Ray restarted on another machine cannot serve it and fails.

    Returns:
      The exit code, or None if the host was told to stop before the node started.
    """
    with self._lock:
      running = self._process is not None and self._process.poll() is None
    if running:  # Ray lost touch with this host for a while; the node kept running.
      return self._process.wait()
    placement = self.place(serves=False)
    if address_ip is not None and placement['ip'] != address_ip:
      raise NodeFailed(f'Node {self._name} was moved by Ray from {address_ip} to '
                       f'{placement["ip"]} ({placement["hostname"]}); its clients hold the old '
                       'address, so the run cannot go on.')
    self._end_previous_node(placement)
    with self._lock, open(local_lib.node_log_path(self._run_dir, self._name), 'ab') as log:
      if self._stopping:
        return None
      log.write(f'--- ray: {self._name} on Ray node {placement["ray_node_id"]} '
                f'({placement["hostname"]}, {placement["ip"]}), accelerators '
                f'{placement["accelerator_ids"]}\n'.encode())
      log.flush()
      # As on the local launcher: its own session, and SIGTERM when its host dies.
      self._process = local_lib.start_worker(self._run_dir, self._name, log, self._secret)
      path = placement_path(self._run_dir, self._name)
      with open(f'{path}.tmp', 'w') as file:
        json.dump(dict(placement, node_pid=self._process.pid), file, indent=2)
      os.replace(f'{path}.tmp', path)
    return self._process.wait()

  def _end_previous_node(self, placement: dict):
    """Ends the node that this host's dead predecessor started on this machine.

    That node got SIGTERM when its host died but may still be finishing its step. Two
    copies of a node must not run at once: a serving node's copies would share its port
    (gRPC binds with SO_REUSEPORT) and split its clients between them. It gets the stop
    timeout to end, then SIGKILL. (A predecessor on another machine is out of reach;
    there the node ends by itself on the same SIGTERM.)
    """
    try:
      with open(placement_path(self._run_dir, self._name)) as file:
        previous = json.load(file)
    except (OSError, ValueError):
      return  # The node's first run.
    pid = previous.get('node_pid')
    if pid is None or previous.get('ray_node_id') != placement['ray_node_id']:
      return
    deadline = time.monotonic() + self._stop_timeout_s
    while _is_running_node(pid, self._run_dir, self._name) and time.monotonic() < deadline:
      time.sleep(0.1)
    if _is_running_node(pid, self._run_dir, self._name):
      with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # Its own session: the group is the node's.
      while _is_running_node(pid, self._run_dir, self._name):
        time.sleep(0.05)

  def terminate(self):
    """Asks the node to stop (SIGTERM); a later `run` starts nothing."""
    with self._lock:
      self._stopping = True
      if self._process is not None and self._process.poll() is None:
        self._process.send_signal(signal.SIGTERM)

  def kill(self):
    with self._lock:
      self._stopping = True
      if self._process is not None and self._process.poll() is None:
        os.killpg(self._process.pid, signal.SIGKILL)
