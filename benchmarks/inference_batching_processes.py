"""The inference batching benchmark's child processes: starting, watching, stopping, metering.

Children are started with multiprocessing's "spawn" method and report to the parent on
one queue as (event, name, payload) tuples. Each child limits its threads before
anything loads JAX, and dies with the parent. CPU time and memory are read from /proc.

Nothing heavy is imported here: spawned children import this module first.
"""
import multiprocessing
import os
import queue
import re
import time
import traceback
from typing import Any

from chorus.launch.processes import die_with_parent
from chorus.launch.processes import use_cores

# Without it every JAX process starts an Eigen pool of one thread per core, so 32
# processes on 2 cores would run 64 compute threads. It leaves XLA:CPU's own threads
# (loop fusions split over cores, the thunk executor): a process that must compute on one
# thread also gets one core (`one_core`), since XLA sizes its pool from the affinity mask.
# (`intra_op_parallelism_threads` is a TensorFlow session option, not an XLA flag: XLA
# ignores it in XLA_FLAGS, so it is not set.)
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false'
SINGLE_THREAD_ENV = {'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1',
                     'MKL_NUM_THREADS': '1', 'TF_CPP_MIN_LOG_LEVEL': '2'}


def _limit_threads(single_thread_xla: bool, one_core: bool):
  os.environ.update(SINGLE_THREAD_ENV)
  if single_thread_xla:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} {SINGLE_THREAD_XLA_FLAGS}'.strip()
  if one_core:
    use_cores(1, 'one_core')


def _child(target, name: str, parent_pid: int, single_thread_xla: bool, one_core: bool,
           events, *args):
  """Entry of every child: thread limits first, then `target`; errors go to the parent."""
  die_with_parent(parent_pid)
  _limit_threads(single_thread_xla, one_core)
  try:
    target(name, events, *args)
  except Exception:  # pylint: disable=broad-except
    events.put(('error', name, traceback.format_exc()))


class Children:
  """Every process this benchmark starts; `terminate()` leaves none behind."""

  def __init__(self):
    self._context = multiprocessing.get_context('spawn')
    self.events = self._context.Queue()
    self.processes: dict[str, multiprocessing.Process] = {}

  def Event(self):  # pylint: disable=invalid-name
    return self._context.Event()

  def Value(self, *args):  # pylint: disable=invalid-name
    return self._context.Value(*args)

  def start(self, name: str, target, single_thread_xla: bool, *args, one_core: bool = False):
    """Starts `target(name, events, *args)` in a new process called `name`; `one_core`
    keeps it on the first core this process may use.

    `target` must be a module-level function of a module that imports nothing heavy
    (see inference_batching_roles), so that the thread limits come before JAX loads.
    """
    process = self._context.Process(
        target=_child, name=name, daemon=True,
        args=(target, name, os.getpid(), single_thread_xla, one_core, self.events) + args)
    process.start()
    self.processes[name] = process

  def wait_for(self, kind: str, names, timeout_s: float) -> dict[str, Any]:
    """Collects one `kind` event from each of `names`; raises if a child fails or dies."""
    pending, found = set(names), {}
    deadline = time.monotonic() + timeout_s
    while pending:
      if time.monotonic() > deadline:
        raise TimeoutError(f'No {kind!r} from {sorted(pending)[:5]} within {timeout_s} s; '
                           'the machine may be overloaded: try fewer actors.')
      try:
        event, name, payload = self.events.get(timeout=1.0)
      except queue.Empty:
        dead = [n for n in pending if self.processes[n].exitcode is not None]
        if dead:
          raise RuntimeError(f'Process {dead[0]} exited with code '
                             f'{self.processes[dead[0]].exitcode} before sending {kind!r}.')
        continue
      if event == 'error':
        raise RuntimeError(f'Process {name} failed:\n{payload}')
      if event == kind and name in pending:
        pending.remove(name)
        found[name] = payload
    return found

  def stop(self, names, timeout_s: float = 30.0):
    """Lets `names` exit on their own for up to `timeout_s` in all, then terminates them."""
    deadline = time.monotonic() + timeout_s
    for name in names:
      self.processes[name].join(max(0.0, deadline - time.monotonic()))
    self.terminate(names)

  def terminate(self, names=None):
    """SIGTERM, then SIGKILL after 5 s, to `names` (default: every child)."""
    names = list(self.processes) if names is None else list(names)
    processes = [self.processes.pop(name) for name in names if name in self.processes]
    for process in processes:
      if process.is_alive():
        process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
      process.join(max(0.0, deadline - time.monotonic()))
      if process.is_alive():
        process.kill()
        process.join()


def rss_bytes(pid: int | str = 'self') -> int:
  """Resident memory of a process (0 once it is gone)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      match = re.search(r'^VmRSS:\s+(\d+) kB', f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0
  except OSError:
    return 0


def machine_cpu_seconds() -> tuple[float, float]:
  """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
  with open('/proc/stat') as f:
    ticks = [int(value) for value in f.readline().split()[1:9]]
  idle = ticks[3] + ticks[4]  # idle + iowait
  clock_ticks = os.sysconf('SC_CLK_TCK')
  return (sum(ticks) - idle) / clock_ticks, sum(ticks) / clock_ticks


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds a process has used so far (0 once it is gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, IndexError, ValueError):
    return 0.0
