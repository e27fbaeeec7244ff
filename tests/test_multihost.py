"""One learner in two processes, joined by jax.distributed on loopback: its updates equal
those of one process with the same devices.

Each process has one CPU device: with several local CPU devices per process, jax 0.4.34's
Gloo collectives abort (`op.preamble.length <= op.nbytes`, concurrent collectives of the
local devices mixing on one connection). GPU and TPU hosts use NCCL or ICI instead.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

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
    learner.update(distributed.global_batch(local, mesh))
  gathered = distributed.gather_to_host(learner.state.params)
  print(json.dumps({
      'process_count': jax.process_count(), 'device_count': jax.device_count(),
      'params': np.asarray(gathered['layer_0']['mlp']['down']['kernel']).tolist(),
      'initial': np.asarray(params['layer_0']['mlp']['down']['kernel']).tolist()}))


if __name__ == '__main__':
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
          tuple(int(n) for n in sys.argv[5].split(',')))
