"""The Ray actor that hosts one node of a program: `python -m chorus.launch.worker` as its child.

Running the node in a child rather than in the Ray worker keeps JAX, TensorFlow and gRPC
state out of the actor (a restarted node starts clean), puts the output of C++ libraries
in the node's log, and stops a node with SIGTERM the same way on both launchers.
"""
import json
import os
import signal
import socket
import subprocess
import threading

import ray

from chorus.launch import local as local_lib
from chorus.launch.local import NodeFailed


def placement_path(run_dir: str, node: str) -> str:
  """Where a node's host records the Ray node it last ran on."""
  return os.path.join(run_dir, 'nodes', f'{node}.ray.json')


@ray.remote(max_concurrency=2)
class NodeHost:
  """Runs one node's worker process on the Ray node this actor was placed on.

  Two calls run at once, so `terminate` and `kill` reach the process while `run` waits.
  """

  def __init__(self, run_dir: str, name: str, secret: str | None = None):
    self._run_dir = run_dir
    self._name = name
    self._secret = secret  # The run's (auth.py): into the node's environment, nowhere else.
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
    with open(placement_path(self._run_dir, self._name), 'w') as file:
      json.dump(placement, file, indent=2)
    with self._lock, open(local_lib.node_log_path(self._run_dir, self._name), 'ab') as log:
      if self._stopping:
        return None
      log.write(f'--- ray: {self._name} on Ray node {placement["ray_node_id"]} '
                f'({placement["hostname"]}, {placement["ip"]}), accelerators '
                f'{placement["accelerator_ids"]}\n'.encode())
      log.flush()
      # As on the local launcher: its own session, and SIGTERM when its host dies.
      self._process = local_lib.start_worker(self._run_dir, self._name, log, self._secret)
    return self._process.wait()

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
