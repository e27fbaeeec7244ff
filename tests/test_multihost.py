"""One learner in two processes of four CPU devices each, joined by jax.distributed on
loopback: its updates equal those of one process with the same eight devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_MESH = (2, 2, 2)  # data, fsdp, tensor over the 8 devices.


def _run(args, devices: int) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
  out, err = process.communicate(timeout=900)
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.splitlines()[-1])


def test_two_processes_train_as_one_with_their_devices_together():
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  workers = [_run(['worker', index, 2, f'127.0.0.1:{port}'], devices=4) for index in range(2)]
  single = _result(_run(['worker', 0, 1, ''], devices=8))
  results = [_result(worker) for worker in workers]
  assert [r['process_count'] for r in results] == [2, 2]
  assert [r['device_count'] for r in results] == [8, 8]
  assert single['device_count'] == 8 and single['process_count'] == 1
  for result in results:  # Every process gathered the same, whole parameters.
    np.testing.assert_allclose(result['params'], single['params'], atol=1e-5)
  assert float(np.max(np.abs(np.asarray(single['params']) - single['initial']))) > 2e-4


def _worker(index: int, count: int, coordinator: str):
  """Three V-trace updates on a global (2, 2, 2) mesh; prints gathered parameters."""
  # pylint: disable=g-import-not-at-top
  from chorus.learners import distributed
  distributed.initialize(distributed.ProcessGroup(index, count, coordinator))
  import jax
  from chorus import core
  from chorus import models
  from chorus import schema
  from chorus.actors import reverse_digits
  from chorus.agents import builder as builder_lib
  from chorus.agents import vtrace
  from chorus.learners import learner as learner_lib
  from chorus.models import sharding

  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  spec = core.SequenceSpec(16, 12)
  mesh = sharding.make_mesh(sharding.MeshConfig(*_MESH))
  learner = vtrace.make_vtrace_learner(builder_lib.LearnerContext(
      model=decoder, sequence=spec, task=task, params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(1e-4, 1.0), mesh=mesh), vtrace.VTraceConfig())
  rng = np.random.default_rng(0)
  for _ in range(3):
    trajectories = []
    for _ in range(16):
      prompt = task.train_prompt(rng)
      completion = task.demonstration(prompt, rng)
      trajectories.append(core.Trajectory(
          prompt_tokens=np.asarray(task.encode_prompt(prompt), np.int32),
          completion_tokens=np.asarray(completion, np.int32),
          behaviour_logprobs=-rng.exponential(size=len(completion)).astype(np.float32),
          reward=float(rng.random()), terminated=True, param_version=0))
    batch = schema.CORE_SCHEMA.batch_trajectories(trajectories, spec)
    share = len(trajectories) // jax.process_count()
    local = jax.tree_util.tree_map(lambda x: x[index * share:(index + 1) * share], batch)
    learner.update(distributed.global_batch(local, mesh))
  gathered = distributed.gather_to_host(learner.state.params)
  print(json.dumps({
      'process_count': jax.process_count(), 'device_count': jax.device_count(),
      'params': np.asarray(gathered['layer_0']['mlp']['down']['kernel']).tolist(),
      'initial': np.asarray(params['layer_0']['mlp']['down']['kernel']).tolist()}))


if __name__ == '__main__':
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
