"""Helpers for child processes, light enough to import before JAX or TensorFlow load.

`launch.local` imports the experiment config and with it every role; a process that only
needs these helpers (a benchmark's spawned child, say) imports this module instead.
"""
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None):
  """Makes the kernel send this process SIGTERM when its parent dies, even by SIGKILL.

  Args:
    parent_pid: the parent's pid, where the caller knows it: if the parent died before
      this call took effect, this process exits at once instead of living on orphaned.
  """
  ctypes.CDLL('libc.so.6', use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  if parent_pid is not None and os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access


def is_alive(pid: int) -> bool:
  """Whether process `pid` exists and has not exited (a zombie waiting to be reaped has)."""
  try:
    with open(f'/proc/{pid}/stat') as file:
      return file.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def use_cores(count: int, setting: str, index: int = 0) -> list[int]:
  """Keeps this process on `count` of the cores it may use; 0 leaves it on all of them.

  Process `index` of several alike (the servers of one machine) takes the `index`-th run
  of `count` cores, wrapping around, so that they do not all crowd onto the first ones.
  XLA:CPU sizes its thread pool from this affinity mask when JAX first computes, so call
  it before that: then `count` bounds XLA's threads too.

  Args:
    count: cores to keep, 0 for all.
    setting: the config field `count` came from, for the error message.
    index: which of several alike processes this is.

  Returns:
    the cores the process runs on now, sorted.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if not count:
    return allowed
  if count > len(allowed):
    raise ValueError(f'{setting}={count}, but this process may use {len(allowed)} core(s) '
                     f'({allowed}); lower it, or set 0 for all of them.')
  cores = {allowed[(index * count + offset) % len(allowed)] for offset in range(count)}
  os.sched_setaffinity(0, cores)
  return sorted(cores)
