"""A stranger on the host attacks a live `chorus run`: every call without the run's secret
is refused, the secret is nowhere in the run directory, and the run finishes unharmed."""
import glob
import json
import math
import os
import subprocess
import sys
import time

import grpc
import jax
import numpy as np
import pytest

from chorus import models
from chorus.inference_server import auth
from chorus.inference_server import health_pb2
from chorus.inference_server import health_pb2_grpc
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.tests import test_local_run


def _wait_for(path: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    assert process.poll() is None, f'The run ended before {path} appeared.'
    assert time.monotonic() < deadline, f'{path} never appeared.'
    time.sleep(0.5)


def _server_secret(run_dir: str) -> str:
  """The secret in the inference server process's environment (as root may read it)."""
  with open(os.path.join(run_dir, 'nodes', 'processes.jsonl')) as file:
    pids = [json.loads(line)['pid'] for line in file
            if json.loads(line)['node'] == 'inference_server_0']
  with open(f'/proc/{pids[-1]}/environ', 'rb') as file:
    variables = dict(item.split(b'=', 1) for item in file.read().split(b'\0') if b'=' in item)
  return variables[auth.SECRET_ENV.encode()].decode()


def _refused(call) -> grpc.StatusCode:
  try:
    call()
  except InferenceError as error:
    return error.code
  raise AssertionError('The call was served.')


def test_a_stranger_cannot_sample_or_push_and_the_run_finishes_unharmed(tmp_path):
  run_dir = str(tmp_path / 'attacked')
  process = subprocess.Popen(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       *test_local_run._SMALL_RUN],  # pylint: disable=protected-access
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    spec_path = os.path.join(run_dir, 'nodes', 'inference_server_0.json')
    _wait_for(spec_path, process)
    with open(spec_path) as file:
      kwargs = json.load(file)['kwargs']
    address = f'{kwargs["host"]}:{kwargs["port"]}'
    with grpc.insecure_channel(address) as channel:  # Health needs no secret.
      health = health_pb2_grpc.HealthStub(channel).Check(
          health_pb2.HealthCheckRequest(), timeout=600, wait_for_ready=True)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    secret = _server_secret(run_dir)

    decoder = models.DecoderConfig.tiny(32)
    nan_params = jax.tree_util.tree_map(lambda x: np.full(np.shape(x), np.nan, np.float32),
                                        models.init_params(decoder, jax.random.PRNGKey(0)))
    refusals = []
    with InferenceClient(address, timeout_s=30, secret='') as stranger:
      refusals += [_refused(lambda: stranger.generate([[1, 2]])), _refused(stranger.status)]
    for model, version, resume in (('policy', 10**6, False), ('policy', 2**63 - 1, True),
                                   ('reference', 1, False)):
      with ParameterPublisher(address, model=model, timeout_s=30, secret='') as stranger:
        with pytest.raises(InferenceError) as raised:
          stranger.publish(nan_params, version, resume=resume)
      refusals.append(raised.value.code)
    assert refusals == [grpc.StatusCode.UNAUTHENTICATED] * 5

    stdout, stderr = process.communicate(timeout=900)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == 12
  assert math.isfinite(summary['final_eval_reward'])
  # The secret is in no file of the run (config, node specs, logs, metrics) nor its output.
  assert secret not in stdout + stderr
  for path in glob.glob(os.path.join(run_dir, '**', '*'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) < (64 << 20):
      with open(path, 'rb') as file:
        assert secret.encode() not in file.read(), path
