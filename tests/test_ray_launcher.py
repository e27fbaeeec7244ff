"""The program on a real two-node Ray cluster on loopback: placement, restarts, the run's files.

The head node stands for an accelerator machine (a custom resource 'accelerator', no
CPUs to place actors on); the second node is a CPU machine. Every Ray instance of the
suite keeps its files in a folder of its own and uses a token of its own (conftest.py),
so the tests neither need nor touch what other Ray users left in /tmp/ray or ~/.ray.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import ray
from ray import cluster_utils

from chorus.datasets import read_trajectories
from chorus.launch import experiment
from chorus.launch import local
from chorus.launch import processes
from chorus.launch.launcher_config import LauncherConfig
from chorus.launch import program as program_lib
from chorus.launch import ray_launcher
from chorus.launch import ray_node_host
from chorus.metrics import read_metrics
from chorus.tests import test_local_run

pytestmark = pytest.mark.slow

_ACCELERATOR = {'accelerator': 1}
_MB = 2**20


class _TwoNodeCluster:
  """A head node with 3 'accelerator' and no CPUs, and a CPU node with 4 CPUs."""

  def __init__(self):
    # conftest.py gave this session's Ray a private RAY_TMPDIR: a short path, as Ray's
    # socket paths under it must fit in 107 bytes.
    self.temp_dir = os.environ['RAY_TMPDIR']
    # Children this test process had before Ray (a multiprocessing resource tracker of an
    # earlier test lives as long as the process): not Ray's.
    self.processes_before = set(_descendants(os.getpid()))
    common = dict(node_ip_address='127.0.0.1', object_store_memory=100 * _MB)
    self._cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=0, resources={'accelerator': 3}, include_dashboard=False,
                            temp_dir=self.temp_dir, **common))
    self.accelerator_node_id = self._cluster.head_node.node_id
    # Logical CPUs are placement slots: warm start (first alone), replay, two actor processes.
    self.cpu_node_id = self._cluster.add_node(num_cpus=4, **common).node_id
    self.address = self._cluster.address

  def shutdown(self):
    if self._cluster is not None:
      ray.shutdown()  # A driver left connected by a failed test blocks removing the head.
      self._cluster.shutdown()
      self._cluster = None


@pytest.fixture(scope='module', name='cluster')
def fixture_cluster():
  cluster = _TwoNodeCluster()
  yield cluster
  cluster.shutdown()


@pytest.fixture(scope='module', name='ray_run')
def fixture_ray_run(cluster, tmp_path_factory):
  """The local run test's experiment, through the CLI on the Ray cluster, with a learner of
  two processes (one inference server and two learner processes: 3 accelerators)."""
  run_dir = str(tmp_path_factory.mktemp('ray_run') / 'text_vtrace')
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       '--launcher', 'ray', '--ray-address', cluster.address,
       '--set', f'launcher.ray_accelerator_resources={json.dumps(_ACCELERATOR)}',
       '--set', 'launcher.ray_cpu_resources={"CPU": 1}', '--set', 'learner.processes=2'
      ] + test_local_run._SMALL_RUN,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return run_dir


def _placements(run_dir: str) -> dict[str, dict]:
  nodes_dir = os.path.join(run_dir, 'nodes')
  placements = {}
  for name in os.listdir(nodes_dir):
    if name.endswith('.ray.json'):
      with open(os.path.join(nodes_dir, name)) as file:
        placements[name[:-len('.ray.json')]] = json.load(file)
  return placements


def _program(run_dir: str) -> list[program_lib.Node]:
  with open(os.path.join(run_dir, 'config.json')) as file:
    return program_lib.make_program(
        experiment.from_dict(experiment.ExperimentConfig, json.load(file)))


def test_ray_run_finishes_with_the_same_run_directory_as_a_local_run(ray_run):
  # What a local run leaves (tests/test_local_run.py); nodes/ also holds Ray placements.
  assert set(os.listdir(ray_run)) >= {
      'summary.json', 'metrics.jsonl', 'curves.png', 'checkpoints', 'rlds', 'logs',
      'tensorboard', 'config.json', 'nodes'}
  with open(os.path.join(ray_run, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == 12
  assert summary['final_eval']['param_versions'] == [12]
  assert max(map(int, os.listdir(os.path.join(ray_run, 'checkpoints', 'learner')))) == 12
  assert sorted(os.listdir(os.path.join(ray_run, 'logs'))) == sorted(
      f'{node.name}.log' for node in _program(ray_run))


def test_the_learner_ran_as_two_processes_joined_through_the_first(ray_run):
  program = {node.name: node for node in _program(ray_run)}
  assert [name for name, node in program.items() if node.role == 'learner'] == [
      'learner', 'learner_process_1']
  with open(os.path.join(ray_run, 'nodes', 'learner.json')) as file:
    learner = json.load(file)['kwargs']
  with open(os.path.join(ray_run, 'nodes', 'learner_process_1.json')) as file:
    second = json.load(file)['kwargs']
  assert second['coordinator'] == f'{learner["host"]}:{learner["port"]}'
  log = open(os.path.join(ray_run, 'logs', 'learner_process_1.log')).read()
  assert f'Connecting to JAX distributed service on {second["coordinator"]}' in log
  learner_lines = [r for r in read_metrics(os.path.join(ray_run, 'metrics.jsonl'))
                   if r.get('kind') == 'learner']
  assert {r['node'] for r in learner_lines} == {'learner'}  # Process 0 alone logs.


def test_accelerator_nodes_and_actors_run_on_different_ray_nodes(ray_run, cluster):
  placements = _placements(ray_run)
  program = _program(ray_run)
  assert sorted(placements) == sorted(node.name for node in program)
  for node in program:
    expected = cluster.accelerator_node_id if node.accelerator else cluster.cpu_node_id
    assert placements[node.name]['ray_node_id'] == expected, node.name
  actors = [node.name for node in program if node.role == 'actor']
  assert actors and all(placements[name]['ray_node_id'] != placements['learner']['ray_node_id']
                        for name in actors)
  assert all(p['ip'] == '127.0.0.1' for p in placements.values())
  servers = [node.name for node in program if node.serves]
  for name in servers:
    with open(os.path.join(ray_run, 'nodes', f'{name}.json')) as file:
      assert json.load(file)['kwargs']['host'] == '127.0.0.1'


def test_rlds_episodes_read_back_and_match_the_actors_final_metrics(ray_run):
  finals = {r['node']: r for r in read_metrics(os.path.join(ray_run, 'metrics.jsonl'))
            if r.get('kind') == 'actor_final'}
  assert sorted(finals) == ['actor_0', 'actor_1']
  for actor_id in (0, 1):
    episodes = read_trajectories(os.path.join(ray_run, 'rlds', f'actor_{actor_id:03d}'))
    assert len(episodes) == finals[f'actor_{actor_id}']['episodes'] > 0


def test_no_node_process_outlives_the_ray_run(ray_run):
  assert test_local_run._processes_mentioning(ray_run) == []


def _write_config(run_dir: str):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, 'config.json'), 'w') as file:
    json.dump(experiment.to_dict(experiment.ExperimentConfig()), file)


@pytest.fixture(name='launcher')
def fixture_launcher(cluster, tmp_path):
  launcher = ray_launcher.RayLauncher(
      str(tmp_path / 'run'),
      LauncherConfig(max_restarts=1, restart_backoff_s=0.1, stop_timeout_s=20,
                     ray_accelerator_resources=_ACCELERATOR, ray_placement_timeout_s=20),
      address=cluster.address)
  yield launcher
  launcher.close()


def test_failing_setup_node_raises_naming_the_node_and_its_log(launcher):
  # No config.json in the run directory: the node's worker fails as it starts.
  with pytest.raises(local.NodeFailed, match=r'Node warm_start exited with code 1.*warm_start\.log'
                     r'[\s\S]*config\.json'):
    launcher.run_to_completion(program_lib.Node('warm_start', 'warm_start', program_lib.SETUP),
                               should_stop=lambda: False)


def test_crashing_restartable_node_is_restarted_until_its_limit(launcher):
  launcher.start([program_lib.Node('actors_0', 'actor', program_lib.WORKER, restart=True)])
  deadline = time.monotonic() + 120
  with pytest.raises(local.NodeFailed, match=r'Node actors_0 failed 2 times.*exited with code 1'):
    while time.monotonic() < deadline:
      launcher.poll()
      time.sleep(0.1)
  assert launcher.restarts == {'actors_0': 1}
  with open(launcher.log_path('actors_0')) as file:
    assert file.read().count('--- launcher: restarting actors_0') == 1


def test_node_asking_for_more_than_any_ray_node_has_fails_to_be_placed(cluster, tmp_path):
  launcher = ray_launcher.RayLauncher(
      str(tmp_path / 'run'),
      LauncherConfig(ray_accelerator_resources={'accelerator': 4}, ray_placement_timeout_s=3),
      address=cluster.address)
  try:
    with pytest.raises(local.NodeFailed,
                       match=r"no host for nodes \['learner'\].*'accelerator': 4"):
      launcher.start([program_lib.Node('learner', 'learner', program_lib.MAIN,
                                       accelerator=True)])
  finally:
    launcher.close()


def test_node_whose_ray_actor_dies_is_restarted_by_ray_at_its_address(launcher):
  _write_config(launcher.run_dir)
  replay = program_lib.Node('replay', 'replay', program_lib.SERVICE, kwargs=dict(server_index=0),
                            serves=True, restart=True)
  launcher.start([replay])
  address = launcher.addresses['replay']
  assert address.startswith('127.0.0.1:')
  first = _wait_for_placement(launcher.run_dir, 'replay', previous=None)
  os.kill(first['host_pid'], signal.SIGKILL)  # The Ray worker hosting the node, not the node.
  deadline = time.monotonic() + 120
  while not launcher.restarts and time.monotonic() < deadline:
    assert launcher.poll()
    time.sleep(0.1)
  assert launcher.restarts == {'replay': 1}
  second = _wait_for_placement(launcher.run_dir, 'replay', previous=first)
  assert second['ray_node_id'] == first['ray_node_id']
  assert second['host_pid'] != first['host_pid']
  # The new host ended the orphaned first node before it started the second: never two
  # copies (they would share the port).
  assert test_local_run._processes_mentioning(launcher.run_dir) == [second['node_pid']]
  assert launcher.addresses['replay'] == address
  _wait_until_listening(address)
  launcher.stop()
  assert test_local_run._processes_mentioning(launcher.run_dir) == []


def _wait_until_listening(address: str):
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.2)


def _wait_for_placement(run_dir: str, node: str, previous: dict | None) -> dict:
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    try:
      with open(ray_node_host.placement_path(run_dir, node)) as file:
        placement = json.load(file)
      if placement != previous:
        return placement
    except (OSError, json.JSONDecodeError):
      pass
    time.sleep(0.1)
  raise TimeoutError(f'{node} wrote no new placement in 60 s')


def test_launcher_without_an_address_starts_and_ends_its_own_ray_on_loopback(tmp_path):
  with pytest.raises(ValueError, match=r"\{'tpu_v9': 1\}.*launcher\.ray_accelerator_resources"):
    ray_launcher.RayLauncher(str(tmp_path / 'a'),
                             LauncherConfig(ray_accelerator_resources={'tpu_v9': 1}))
  assert not ray.is_initialized()
  launcher = ray_launcher.RayLauncher(str(tmp_path / 'b'))
  try:
    assert [node['NodeManagerAddress'] for node in ray.nodes()] == ['127.0.0.1']
  finally:
    launcher.close()
  assert not ray.is_initialized()


def test_default_resources_fit_the_default_program_on_this_machines_own_ray(tmp_path):
  # No GPU and 2 cores here: accelerator nodes ask for what this Ray has, and it gets a
  # placement slot per node however few cores the machine has.
  program = program_lib.make_program(experiment.ExperimentConfig())
  launcher = ray_launcher.RayLauncher(str(tmp_path / 'run'),
                                      num_nodes=program_lib.max_nodes_at_once(program))
  try:
    cluster = ray.cluster_resources()
    assert all(cluster.get(name, 0) >= amount
               for name, amount in launcher.accelerator_resources.items())
    assert cluster['CPU'] >= len(program) - 1  # Every node but the warm start at once.
    launcher._check_fits([node for node in program if node.kind != program_lib.SETUP])
  finally:
    launcher.close()


def test_ray_run_on_this_machine_needs_no_address_and_no_environment(tmp_path):
  run_dir = str(tmp_path / 'run')
  env = {name: value for name, value in os.environ.items()
         if not name.startswith(('CHORUS_', 'RAY_ADDRESS'))}
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       '--launcher', 'ray'] + test_local_run._SMALL_RUN,
      capture_output=True, text=True, timeout=600, check=False, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    assert json.load(file)['learner_steps'] == 12
  assert test_local_run._processes_mentioning(run_dir) == []


def _descendants(pid: int) -> list[int]:
  children = {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as file:
        parent = int(file.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(parent, []).append(int(entry))
  found, stack = [], [pid]
  while stack:
    for child in children.get(stack.pop(), []):
      found.append(child)
      stack.append(child)
  return found


def test_no_ray_process_outlives_the_cluster(cluster):
  # Ray renames its workers (ray::...), so they are found as this process's descendants.
  ray_processes = [pid for pid in _descendants(os.getpid())
                   if pid not in cluster.processes_before]
  assert ray_processes
  cluster.shutdown()
  deadline = time.monotonic() + 30
  while any(map(processes.is_alive, ray_processes)) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert [pid for pid in ray_processes if processes.is_alive(pid)] == []
