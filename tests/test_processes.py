"""launch/processes on real processes: a node never outlives its parent, and keeps to the
cores it is given."""
import os
import signal
import subprocess
import sys
import time

import pytest

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


_CORES_HELPER = """
import os, sys
from chorus.launch.processes import use_cores
kept = use_cores(int(sys.argv[1]), 'inference.cpu_cores', int(sys.argv[2]))
assert kept == sorted(os.sched_getaffinity(0)), kept  # It returns the cores it runs on.
print(kept)
"""


def _cores_of_a_process_given(count: int, index: int) -> str:
  return subprocess.run([sys.executable, '-c', _CORES_HELPER, str(count), str(index)],
                        capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def test_processes_keep_to_their_run_of_cores_and_zero_means_all():
  allowed = sorted(os.sched_getaffinity(0))
  assert _cores_of_a_process_given(0, 0) == str(allowed)
  assert _cores_of_a_process_given(1, 0) == str(allowed[:1])
  # The second of several one-core processes takes the next core, wrapping around.
  assert _cores_of_a_process_given(1, 1) == str([allowed[1 % len(allowed)]])
  assert _cores_of_a_process_given(1, len(allowed)) == str(allowed[:1])


def test_more_cores_than_the_process_may_use_is_an_error_naming_the_setting():
  too_many = len(os.sched_getaffinity(0)) + 1
  before = os.sched_getaffinity(0)
  with pytest.raises(ValueError, match=f'inference.cpu_cores={too_many}, but this process may '
                                       'use'):
    processes.use_cores(too_many, 'inference.cpu_cores')
  assert os.sched_getaffinity(0) == before
