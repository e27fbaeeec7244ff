"""One learner in two processes, joined by jax.distributed on loopback: its updates equal
those of one process with the same devices, and the launcher runs a whole experiment with
such a learner (the Ray launcher's test runs one too: tests/test_ray_launcher.py).

Each process has one CPU device: with several local CPU devices per process, jax 0.4.34's
Gloo collectives abort (`op.preamble.length <= op.nbytes`, concurrent collectives of the
local devices mixing on one connection). GPU and TPU hosts use NCCL or ICI instead.
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from chorus.metrics import read_metrics
from chorus.tests import test_local_run

pytestmark = pytest.mark.slow


def _run(args, devices: int, output: pathlib.Path) -> subprocess.Popen:
  # Output goes to files: a worker blocked on a full pipe would hold the other one at
  # jax.distributed's shutdown barrier.
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  with open(output.with_suffix('.out'), 'w') as out, open(output.with_suffix('.err'), 'w') as err:
    process = subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env,
                               stdout=out, stderr=err, text=True)
  process.output = output
  return process


def _result(process: subprocess.Popen) -> dict:
  process.wait(timeout=900)
  assert process.returncode == 0, process.output.with_suffix('.err').read_text()[-3000:]
  return json.loads(process.output.with_suffix('.out').read_text().splitlines()[-1])


@pytest.mark.parametrize('mesh', ['2,1,1', '1,2,1'], ids=['data', 'fsdp'])
def test_two_processes_train_as_one_with_their_devices_together(mesh, tmp_path):
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  workers = [_run(['worker', index, 2, f'127.0.0.1:{port}', mesh], 1, tmp_path / f'worker{index}')
             for index in range(2)]
  single = _result(_run(['worker', 0, 1, '', mesh], 2, tmp_path / 'single'))
  results = [_result(worker) for worker in workers]
  assert [r['process_count'] for r in results] == [2, 2]
  assert [r['device_count'] for r in results] == [2, 2]
  assert single['device_count'] == 2 and single['process_count'] == 1
  for result in results:  # Every process gathered the same, whole parameters.
    np.testing.assert_allclose(result['params'], single['params'], atol=1e-5)
  assert float(np.max(np.abs(np.asarray(single['params']) - single['initial']))) > 2e-4


def _cli_run(run_dir: str, *args: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       *test_local_run._SMALL_RUN, '--set', 'learner.processes=2', *args],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_a_learner_of_two_processes_dies_with_either_then_resumes_in_both_and_finishes(
    tmp_path):
  # pylint: disable=g-import-not-at-top  (JAX in this process only after the workers')
  from chorus.launch import experiment
  from chorus.launch import nodes
  from chorus.models.checkpoints import Checkpointer
  run_dir = str(tmp_path / 'run')
  launcher = _cli_run(run_dir, '--max-learner-steps', '2000',
                      '--set', 'launcher.stop_timeout_s=10')
  deadline = time.monotonic() + 600
  while not os.path.exists(os.path.join(run_dir, 'checkpoints', 'learner', '6')):
    assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
    time.sleep(0.5)
  with open(os.path.join(run_dir, 'nodes', 'processes.jsonl')) as file:
    pids = {r['node']: r['pid'] for r in map(json.loads, file)}
  os.kill(pids['learner_process_1'], signal.SIGKILL)
  output, _ = launcher.communicate(timeout=300)
  assert launcher.returncode != 0
  # Not restarted: it could not rejoin its group.
  assert 'Node learner_process_1 exited with code -9' in output, output[-3000:]
  assert 'restarting learner_process_1' not in pathlib.Path(
      run_dir, 'logs', 'learner_process_1.log').read_text()
  assert test_local_run._processes_mentioning(run_dir) == []

  # Both processes restore the checkpoint that process 0's writer child saved, and go on.
  resumed = subprocess.run([sys.executable, '-m', 'chorus.launch.cli', 'run', '--resume',
                            run_dir, '--max-learner-steps', '18'],
                           capture_output=True, text=True, timeout=900, check=False)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  logs = {name: pathlib.Path(run_dir, 'logs', f'{name}.log').read_text()
          for name in ('learner', 'learner_process_1')}
  resumed_at = {int(re.search(r'Learner resumed at step (\d+)', log).group(1))
                for log in logs.values()}
  assert len(resumed_at) == 1 and 6 <= min(resumed_at) < 18
  port = re.search(r'Starting JAX distributed service on 127\.0\.0\.1:(\d+)',
                   logs['learner']).group(1)
  assert f'Connecting to JAX distributed service on 127.0.0.1:{port}' in logs['learner_process_1']
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == 18
  assert summary['final_eval']['param_versions'] == [18]  # Process 0 pushed the last update.
  records = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  learner_lines = [r for r in records if r.get('kind') == 'learner']
  assert {r['node'] for r in learner_lines} == {'learner'} and learner_lines[-1]['step'] == 18
  assert any(r.get('process') == 'learner_process_1' and r['cpu_seconds'] > 0 for r in records
             if r.get('kind') == 'cpu')  # Its cost is counted with the run's.
  # The last checkpoint holds what both processes trained.
  checkpoints = Checkpointer(os.path.join(run_dir, 'checkpoints', 'learner'))
  assert checkpoints.latest_step() == 18
  with open(os.path.join(run_dir, 'config.json')) as file:
    config = experiment.load_experiment(json.load(file))
  warm = nodes.warm_start_params(config, run_dir)
  state = checkpoints.restore(nodes.make_learner(config, warm).state)
  checkpoints.close()
  assert int(state.step) == 18
  assert max(float(np.max(np.abs(a - b)))
             for a, b in zip(_leaves(state.params), _leaves(warm))) > 1e-4
  assert test_local_run._processes_mentioning(run_dir) == []


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _worker(index: int, count: int, coordinator: str, mesh_shape: tuple[int, ...]):
  """Three V-trace updates on a global (data, fsdp, tensor) mesh; prints gathered params."""
  # pylint: disable=g-import-not-at-top
  from chorus.learners import distributed
  distributed.initialize(distributed.ProcessGroup(index, count, coordinator))
  import jax
  from chorus import core
  from chorus import models
  from chorus.actors import demonstrations
  from chorus.actors import reverse_digits
  from chorus.agents import builder as builder_lib
  from chorus.agents import vtrace
  from chorus.learners import learner as learner_lib
  from chorus.models import sharding

  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  spec = core.SequenceSpec(16, 12)
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  learner = vtrace.make_vtrace_learner(builder_lib.LearnerContext(
      model=decoder, sequence=spec, task=task, params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(1e-4, 1.0), mesh=mesh), vtrace.VTraceConfig())
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = demonstrations.off_policy_batch(task, rng, 16, spec)
    share = 16 // jax.process_count()
    local = jax.tree_util.tree_map(lambda x: x[index * share:(index + 1) * share], batch)
    learner.update(local)  # This process's rows: the learner makes the global batch.
  gathered = distributed.gather_to_host(learner.state.params)
  print(json.dumps({
      'process_count': jax.process_count(), 'device_count': jax.device_count(),
      'params': np.asarray(gathered['layer_0']['mlp']['down']['kernel']).tolist(),
      'initial': np.asarray(params['layer_0']['mlp']['down']['kernel']).tolist()}))


if __name__ == '__main__':
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
          tuple(int(n) for n in sys.argv[5].split(',')))
