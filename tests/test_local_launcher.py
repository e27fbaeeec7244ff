"""The local launcher under faults: a SIGKILLed actor is restarted, Ctrl-C leaves nothing behind."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from chorus.launch import network_namespace
from chorus.launch import processes
from chorus.metrics import read_metrics

pytestmark = pytest.mark.slow

_SHORT_RUN = [
    '--seed', '5', '--set', 'warm_start.steps=20', '--set', 'learner.batch_size=8',
    '--set', 'learner.log_every=5', '--set', 'replay.max_size=32',
    '--set', 'inference.max_batch_size=8', '--set', 'task.num_eval_prompts=16',
]


def _start(run_dir, *args):
  return subprocess.Popen(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir] + _SHORT_RUN +
      list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processes(run_dir) -> list[dict]:
  path = os.path.join(run_dir, 'nodes', 'processes.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as file:
    return [json.loads(line) for line in file if line.strip()]


def _wait_for(condition, timeout_s: float, what: str):
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f'Timed out after {timeout_s} s waiting for {what}.')
    time.sleep(0.5)


def test_sigkilled_nodes_restart_and_two_inference_servers_share_eight_actors(
    tmp_path):
  run_dir = str(tmp_path / 'run')
  metrics_path = os.path.join(run_dir, 'metrics.jsonl')
  # Long enough (300 updates) that the kills below land mid-run on a fast idle machine.
  launcher = _start(run_dir, '--num-actors', '8', '--max-learner-steps', '300',
                    '--set', 'actors_per_process=2', '--set', 'num_inference_servers=2',
                    '--set', 'num_replay_servers=2', '--set', 'evaluation.every_s=5',
                    '--set', 'learner.checkpoint_every=10',
                    '--set', 'replay.checkpoint_every_s=1')
  checkpoints = os.path.join(run_dir, 'checkpoints', 'learner')
  try:
    _wait_for(lambda: read_metrics(metrics_path, node='actor_0'), 300,
              'actor_0 to report episodes')
    os.kill([p['pid'] for p in _processes(run_dir) if p['node'] == 'actors_0'][0], signal.SIGKILL)
    # Any step: the checkpointer keeps only the newest few, so step 10 may be gone.
    _wait_for(lambda: os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints)), 300,
              'the learner to write its first checkpoint')
    os.kill([p['pid'] for p in _processes(run_dir) if p['node'] == 'learner'][0], signal.SIGKILL)
    os.kill([p['pid'] for p in _processes(run_dir) if p['node'] == 'inference_server_1'][0],
            signal.SIGKILL)
    _wait_for(lambda: [r for r in read_metrics(metrics_path, node='replay_1')
                       if r['kind'] == 'replay_checkpoint' and r['inserts']], 300,
              'replay_1 to checkpoint items')
    replay_killed_at = time.time()
    os.kill([p['pid'] for p in _processes(run_dir) if p['node'] == 'replay_1'][0], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=600)
  finally:
    launcher.kill()
  assert launcher.returncode == 0, output[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == 300
  assert summary['final_eval']['param_versions'] == [300]
  # Clients ride out the inference server's and replay's restarts: no actor or learner
  # crash follows them.
  assert summary['restarts'] == {'actors_0': 1, 'learner': 1, 'inference_server_1': 1,
                                 'replay_1': 1}
  # The restarted replay server started from its tables' last checkpoint before the kill.
  replay = read_metrics(metrics_path, node='replay_1')
  last_checkpoint = [r for r in replay if r['kind'] == 'replay_checkpoint'
                     and r['time'] < replay_killed_at][-1]
  restored = [r for r in replay if r['kind'] == 'replay_restored'
              and r['time'] > replay_killed_at]
  assert len(restored) == 1 and restored[0]['inserts'] >= last_checkpoint['inserts'] > 0
  with open(os.path.join(run_dir, 'logs', 'learner.log')) as file:
    assert 'Learner resumed at step' in file.read()
  started = _processes(run_dir)
  assert [p['node'] for p in started].count('actors_0') == 2
  assert [p['node'] for p in started].count('learner') == 2
  assert [p['node'] for p in started].count('replay_1') == 2
  assert not [p for p in started if processes.is_alive(p['pid'])]
  requests = {}
  for record in read_metrics(metrics_path):
    if record.get('kind') == 'inference' and record['model'] == 'policy':
      requests[record['node']] = record['requests']
  assert sorted(requests) == ['inference_server_0', 'inference_server_1']
  assert all(count > 0 for count in requests.values()), requests
  evaluations = read_metrics(metrics_path, node='evaluator')
  assert evaluations and all(0 <= r['reward'] <= 1 for r in evaluations)


def _isolation_available() -> bool:
  try:
    network_namespace.check_available()
    return True
  except OSError:
    return False


def _network_namespace(pid: int) -> str:
  return os.readlink(f'/proc/{pid}/ns/net')


def _refuses_connections(port: int) -> bool:
  try:
    socket.create_connection(('127.0.0.1', port), timeout=5).close()
    return False
  except ConnectionRefusedError:
    return True


# Also the test of `--isolate-network`, where this machine allows network namespaces (the
# test id says which ran): the launcher starts again in a namespace of its own, and the
# same Ctrl-C must stop it and every node. One run either way, to keep the suite short.
_ISOLATED = _isolation_available()


@pytest.mark.parametrize('isolated', [
    pytest.param(_ISOLATED, id='isolated' if _ISOLATED else 'plain-no-namespaces-here')])
def test_sigint_to_the_launcher_stops_every_node(tmp_path, isolated):
  run_dir = str(tmp_path / 'run')
  launcher = _start(run_dir, '--num-actors', '2', '--max-learner-steps', '100000',
                    '--set', 'actors_per_process=1', '--set', 'evaluation.every_s=0',
                    *(['--isolate-network'] if isolated else []))
  try:
    def learner_started():
      path = os.path.join(run_dir, 'logs', 'learner.log')
      return os.path.exists(path) and 'starting role' in open(path).read()
    _wait_for(learner_started, 300, 'the learner to start')
    time.sleep(2)
    if isolated:
      # Every node shares the launcher's namespace (same pid after the exec), not ours...
      assert _network_namespace(launcher.pid) != _network_namespace(os.getpid())
      running = [p['pid'] for p in _processes(run_dir) if processes.is_alive(p['pid'])]
      assert len(running) >= 5  # Replay, inference server, two actors' processes, learner.
      assert {_network_namespace(pid) for pid in running} == {_network_namespace(launcher.pid)}
      # ...so the learner reaches Reverb there, and nothing here reaches any serving port.
      for node in ('replay_0', 'inference_server_0'):
        with open(os.path.join(run_dir, 'nodes', f'{node}.json')) as file:
          assert _refuses_connections(json.load(file)['kwargs']['port']), node
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=120)
  finally:
    launcher.kill()
  assert launcher.returncode == 130, output[-3000:]
  started = _processes(run_dir)
  assert {p['node'] for p in started} >= {'replay_0', 'inference_server_0', 'actors_0', 'learner'}
  assert not [p for p in started if processes.is_alive(p['pid'])]
  # Every node stopped by itself (no SIGKILL after the grace period) and without an error.
  for node in ('learner', 'actors_0', 'actors_1', 'inference_server_0', 'replay_0'):
    with open(os.path.join(run_dir, 'logs', f'{node}.log')) as file:
      log = file.read()
    assert 'Traceback' not in log, log[-2000:]
    assert log.rstrip().endswith('done'), f'{node} did not stop cleanly:\n{log[-2000:]}'


def test_a_service_that_dies_during_start_up_is_reported_at_once(tmp_path):
  # pylint: disable=g-import-not-at-top
  from chorus.launch import experiment
  from chorus.launch import local
  from chorus.launch import program as program_lib
  from chorus.launch import run as run_lib
  from chorus.launch.launcher_config import LauncherConfig
  # No warm-start checkpoint in this run directory: the inference server fails as it starts.
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as file:
    json.dump(experiment.to_dict(experiment.ExperimentConfig()), file)
  launcher = local.LocalLauncher(run_dir, LauncherConfig(max_restarts=0))
  server = program_lib.Node('inference_server_0', 'inference_server', program_lib.SERVICE,
                            kwargs=dict(server_index=0), serves=True, restart=True)
  try:
    launcher.start([server])
    start = time.monotonic()
    with pytest.raises(local.NodeFailed,
                       match=r'inference_server_0 crashed 1 times[\s\S]*No checkpoint'):
      run_lib._wait_for_services(launcher, launcher.addresses['inference_server_0'],
                                 should_stop=lambda: False, tls_dir='')
    # The node's own start-up (imports, the failed restore) is most of this.
    assert time.monotonic() - start < 120
  finally:
    launcher.close()


def _private_mount_command() -> list[str]:
  return ['unshare', '--mount'] + (['--map-root-user'] if os.geteuid() != 0 else [])


def _private_mounts_available() -> bool:
  if shutil.which('unshare') is None:
    return False
  with tempfile.TemporaryDirectory() as directory:
    return subprocess.run(_private_mount_command() + ['--', 'mount', '-t', 'tmpfs', 'tmpfs',
                                                      directory], capture_output=True,
                          check=False).returncode == 0


# In a mount namespace of its own: a small tmpfs as the run's disk, filled up once the
# learner runs; what the run directory holds is printed before the namespace goes.
_FILL_THE_DISK_MID_RUN = '''
set -u
disk=$1; shift
mount -t tmpfs -o size=256m tmpfs "$disk"
"$@" &
launcher=$!
for _ in $(seq 600); do
  grep -qs 'starting role' "$disk/run/logs/learner.log" && break
  sleep 0.5
done
sleep 2
dd if=/dev/zero of="$disk/filler" bs=1M status=none
wait $launcher
code=$?
cat "$disk/run/nodes/processes.jsonl"
exit $code
'''


@pytest.mark.skipif(not _private_mounts_available(),
                    reason='no private mount namespaces here to give the run a small disk')
def test_a_full_disk_stops_the_run_with_one_clear_line_and_no_node_left(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  result = subprocess.run(
      _private_mount_command() + ['--', 'bash', '-c', _FILL_THE_DISK_MID_RUN, 'bash', str(disk),
                                  sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir',
                                  f'{disk}/run', *_SHORT_RUN, '--num-actors', '2',
                                  '--max-learner-steps', '100000', '--set',
                                  'actors_per_process=1', '--set', 'evaluation.every_s=0'],
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
  # The launcher's own last word: what failed and how to go on, not a stack of its own.
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('chorus run: '), result.stderr[-3000:]
  assert 'No space left on device' in result.stderr, result.stderr[-3000:]
  pids = [json.loads(line)['pid'] for line in result.stdout.splitlines()
          if line.startswith('{"node"')]
  assert pids and not [pid for pid in pids if processes.is_alive(pid)]
