"""launch/processes.die_with_parent on real processes: a node never outlives its parent."""
import signal
import subprocess
import sys
import time

from chorus.launch import processes

_HELPER = '''
import os, subprocess, sys, time
from chorus.launch.processes import die_with_parent
if sys.argv[1] == 'wrong_parent':
  die_with_parent(os.getppid() + 1)  # As if the parent died before this call.
  print('survived', flush=True)
elif sys.argv[1] == 'parent':
  parent_pid = os.getpid()
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],
                           preexec_fn=lambda: die_with_parent(parent_pid))
  print(child.pid, flush=True)
  time.sleep(60)
'''


def _helper(mode: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', _HELPER, mode], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_child_whose_parent_already_died_exits_at_once():
  helper = _helper('wrong_parent')
  out, err = helper.communicate(timeout=60)
  assert (helper.returncode, out, err) == (1, '', '')


def test_a_child_gets_sigterm_when_its_parent_is_sigkilled():
  parent = _helper('parent')
  child_pid = int(parent.stdout.readline())
  assert processes.is_alive(child_pid)
  parent.send_signal(signal.SIGKILL)
  parent.wait(timeout=60)
  deadline = time.monotonic() + 30
  while processes.is_alive(child_pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not processes.is_alive(child_pid)
