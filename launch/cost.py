"""What a run costs: CPU-seconds of every node process, and when held-out reward was reached.

Every node process meters itself (`CpuMeter`, started by launch/worker.py, so both
launchers get it): every few seconds, and once when the node ends, it appends

    {"node": "cpu_meter", "kind": "cpu", "process": NODE, "pid": PID, "cpu_seconds": ...,
     "user_seconds": ..., "system_seconds": ..., "time": ...}

to metrics.jsonl: user + system CPU time of the process since it started and of the
children it has waited for (`resource.getrusage`, the numbers that utime + stime +
cutime + cstime of /proc/PID/stat give). The launcher meters its own process the same
way under the name `launcher` (without its children: those are the nodes). A node also
marks the end of its start-up (imports, config: about 4 CPU-seconds for a node that
loads TensorFlow), so that RL's cost can be told apart from that of starting processes.

A run's summary then asks what each process spent between two moments (the RL phase:
actors and learner started -> learner done), reading each process's CPU at a moment by
linear interpolation between its samples: 0 before its first sample (it had not
started, or had only just), its last value after its last (it had ended). A process
that was SIGKILLed loses what it spent after its last sample.
"""
from collections.abc import Iterable, Sequence
import logging
import os
import resource
import threading

from chorus.metrics import MetricsWriter

CPU_KIND = 'cpu'
# The metrics "node" of CPU samples (the process's node is their `process`): readers of
# one node's lines do not get them.
METER_NODE = 'cpu_meter'
STARTED_EVENT = 'started'
LAUNCHER_NODE = 'launcher'
# Held-out reward levels whose first crossing summary.json reports (`time_to_reward`).
REWARD_THRESHOLDS = (0.90, 0.95)


def process_cpu_seconds(include_children: bool = True) -> dict[str, float]:
  """user_seconds, system_seconds and their sum cpu_seconds of this process (and children)."""
  usage = [resource.getrusage(resource.RUSAGE_SELF)]
  if include_children:
    usage.append(resource.getrusage(resource.RUSAGE_CHILDREN))
  user = sum(u.ru_utime for u in usage)
  system = sum(u.ru_stime for u in usage)
  return dict(cpu_seconds=user + system, user_seconds=user, system_seconds=system)


class CpuMeter:
  """Writes this process's CPU time every `every_s` seconds and once more at `stop()`.

  Args:
    metrics_path: the run's metrics.jsonl.
    process: the node's name (or `launcher`).
    every_s: seconds between samples; the interpolation of `CpuLedger` is this coarse.
    include_children: count children this process has waited for (nodes: yes; the
      launcher: no, its children are the nodes, which meter themselves).
  """

  def __init__(self, metrics_path: str, process: str, every_s: float = 2.0,
               include_children: bool = True):
    self._writer = MetricsWriter(metrics_path, METER_NODE)
    self._process = process
    self._every_s = every_s
    self._include_children = include_children
    self._stopped = threading.Event()
    self._sample()  # At start-up: where this process's interpolation begins.
    self._thread = threading.Thread(target=self._run, name='cpu_meter', daemon=True)
    self._thread.start()

  def _sample(self, **extra):
    self._writer.write(kind=CPU_KIND, process=self._process, pid=os.getpid(),
                       **process_cpu_seconds(self._include_children), **extra)

  def _run(self):
    while not self._stopped.wait(self._every_s):
      try:
        self._sample()
      except OSError as error:  # A full or failed disk: the process itself reports it.
        logging.warning('CPU metering stopped: %s', error)
        return

  def mark_started(self):
    """Writes a sample that ends this process's start-up (imports, config): its role begins."""
    self._sample(event=STARTED_EVENT)

  def stop(self):
    """Stops sampling and writes the final sample."""
    self._stopped.set()
    self._thread.join()
    self._sample()
    self._writer.close()


def _samples_by_process(records: Iterable[dict]) -> tuple[dict, dict]:
  """Each process's (time, cpu_seconds) samples, and its start-up's end sample if written."""
  samples, started = {}, {}
  for record in records:
    if record.get('kind') == CPU_KIND:
      key = (record['process'], record['pid'])
      samples.setdefault(key, []).append((record['time'], record['cpu_seconds']))
      if record.get('event') == STARTED_EVENT:
        started[key] = (record['time'], record['cpu_seconds'])
  for series in samples.values():
    series.sort()
  return samples, started


def _cpu_at(series: Sequence[tuple[float, float]], when: float) -> float:
  """A process's CPU-seconds at wall time `when`, interpolated between its samples."""
  if when < series[0][0]:
    return 0.0
  for (t0, c0), (t1, c1) in zip(series, series[1:]):
    if when <= t1:
      return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
  return series[-1][1]


class CpuLedger:
  """The CPU samples of a run's processes, asked what they spent between two moments.

  Args:
    records: metrics.jsonl records (others than `kind == "cpu"` are ignored).
  """

  def __init__(self, records: Iterable[dict]):
    self._samples, self._started = _samples_by_process(records)

  def by_node(self, start: float = float('-inf'), end: float = float('inf')) -> dict[str, float]:
    """CPU-seconds per node (its processes summed: restarts) between wall times start, end."""
    spent = {}
    for (node, _), series in self._samples.items():
      spent[node] = spent.get(node, 0.0) + _cpu_at(series, end) - _cpu_at(series, start)
    return dict(sorted(spent.items()))

  def total(self, start: float = float('-inf'), end: float = float('inf')) -> float:
    return sum(self.by_node(start, end).values())

  def startup(self, start: float = float('-inf'), end: float = float('inf')) -> float:
    """CPU-seconds of the start-up (up to `mark_started`) of processes begun in [start, end]."""
    spent = 0.0
    for key, series in self._samples.items():
      if key in self._started and start <= series[0][0] <= end:
        spent += _cpu_at(series, min(end, self._started[key][0]))
    return spent


def time_to_reward(records: Sequence[dict], ledger: CpuLedger, rl_start: float,
                   thresholds: Sequence[float] = REWARD_THRESHOLDS) -> dict[str, dict | None]:
  """When the evaluator's held-out reward first reached each threshold during RL.

  Returns:
    {f'{threshold:.2f}': {cpu_seconds, cpu_seconds_after_startup, wall_seconds,
    learner_step} or None if never}: CPU of every process (nodes and launcher) and wall
    time from the start of the RL phase to the evaluator's record (written when that
    evaluation finished), the CPU less the start-up (imports, config) of the nodes started
    for the RL phase, and the parameter version it evaluated.
  """
  evals = sorted((r for r in records if r.get('kind') == 'eval' and r['time'] >= rl_start),
                 key=lambda r: r['time'])
  reached = {}
  for threshold in thresholds:
    first = next((r for r in evals if r['reward'] >= threshold), None)
    if first is None:
      reached[f'{threshold:.2f}'] = None
      continue
    cpu_seconds = ledger.total(rl_start, first['time'])
    reached[f'{threshold:.2f}'] = dict(
        cpu_seconds=cpu_seconds,
        cpu_seconds_after_startup=cpu_seconds - ledger.startup(rl_start, first['time']),
        wall_seconds=first['time'] - rl_start, learner_step=first['param_version'])
  return reached


def learner_duty_cycle(records: Sequence[dict]) -> float | None:
  """Share of the learner loop's wall time spent inside updates (None before its first line).

  Each learner metrics line has its window's `duty_cycle` and `window_seconds`; this
  weighs them by the windows' lengths.
  """
  windows = [(r['duty_cycle'], r['window_seconds']) for r in records
             if r.get('kind') == 'learner' and 'duty_cycle' in r]
  wall = sum(seconds for _, seconds in windows)
  return sum(duty * seconds for duty, seconds in windows) / wall if wall > 0 else None
