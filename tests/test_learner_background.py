"""Off the learner's critical path: the background publisher."""
import threading
import time

import pytest

from chorus.learners import background

class _GatedServer:
  """A fake server whose pushes wait for `gate`; records the versions it received."""

  def __init__(self, gate: threading.Event):
    self.gate = gate
    self.versions = []
    self.push_started = threading.Event()

  def push(self, models, version):
    self.push_started.set()
    self.gate.wait()
    self.versions.append((version, models['policy']))

def test_a_burst_reaches_a_slow_server_as_its_first_and_newest_versions_only():
  slow, fast = _GatedServer(threading.Event()), _GatedServer(threading.Event())
  fast.gate.set()
  publisher = background.BackgroundPublisher({'slow': slow.push, 'fast': fast.push})
  publisher.submit({'policy': 'params-1'}, 1)
  assert slow.push_started.wait(10)
  for version in range(2, 11):  # Nine updates while version 1 is stuck in flight: had
    publisher.submit({'policy': f'params-{version}'}, version)  # one blocked, this hangs.
  slow.gate.set()
  publisher.flush(timeout_s=10)
  assert slow.versions == [(1, 'params-1'), (10, 'params-10')]  # Never queued.
  assert fast.versions[-1] == (10, 'params-10')
  assert publisher.pushed_versions() == {'slow': 10, 'fast': 10}
  publisher.close()

def test_a_failed_push_is_raised_by_the_next_submit():
  def broken(models, version):
    raise ConnectionError(f'server down at version {version}')

  publisher = background.BackgroundPublisher({'broken': broken})
  publisher.submit({'policy': 1}, 1)
  with pytest.raises(background.PublishError, match='server down at version 1'):
    publisher.flush(timeout_s=10)
  with pytest.raises(background.PublishError, match='broken'):
    publisher.submit({'policy': 2}, 2)
  publisher.close()
