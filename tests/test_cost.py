"""Cost accounting: node CPU meters against what /proc says, and the ledger's arithmetic."""
import os
import subprocess
import sys
import textwrap

import pytest

from chorus.launch import cost
from chorus.metrics import read_metrics

# A node-like process: a meter, CPU burnt in two threads, and a child it waits for.
_METERED_PROCESS = textwrap.dedent('''
    import subprocess, sys, threading, time
    from chorus.launch import cost

    def burn(seconds):
      end = time.thread_time() + seconds
      while time.thread_time() < end:
        pass

    meter = cost.CpuMeter(sys.argv[1], 'burner', every_s=0.2)
    threads = [threading.Thread(target=burn, args=(0.6,)) for _ in range(2)]
    for thread in threads:
      thread.start()
    subprocess.run([sys.executable, '-c', 'import time\\nend = time.process_time() + 0.8\\n'
                    'while time.process_time() < end: pass'], check=True)
    for thread in threads:
      thread.join()
    meter.stop()
''')


def _waited_children_cpu_seconds() -> float:
  """cutime + cstime of this process from /proc: CPU of every descendant it has reaped."""
  with open('/proc/self/stat') as file:
    fields = file.read().rsplit(')', 1)[1].split()
  # Fields after the command: state is index 0, so cutime and cstime (fields 16, 17) are 13, 14.
  return (int(fields[13]) + int(fields[14])) / os.sysconf('SC_CLK_TCK')


def test_a_node_meter_sums_to_what_proc_reports_for_its_process_tree(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  before = _waited_children_cpu_seconds()
  subprocess.run([sys.executable, '-c', _METERED_PROCESS, str(path)], check=True, timeout=120)
  tree = _waited_children_cpu_seconds() - before
  samples = [r for r in read_metrics(path) if r['kind'] == cost.CPU_KIND]
  assert len(samples) >= 3
  assert tree > 1.8  # What the process tree burnt on purpose, and its start-up.
  assert samples[-1]['cpu_seconds'] == pytest.approx(tree, rel=0.1)
  assert [s['cpu_seconds'] for s in samples] == sorted(s['cpu_seconds'] for s in samples)
  assert cost.CpuLedger(samples).total() == samples[-1]['cpu_seconds']


def _cpu(process, pid, time, cpu_seconds):
  return dict(node=cost.METER_NODE, kind='cpu', process=process, pid=pid, time=time,
              cpu_seconds=cpu_seconds)


def test_ledger_interpolates_each_process_and_sums_a_restarted_node():
  records = [
      _cpu('server', 1, 0.0, 10.0), _cpu('server', 1, 10.0, 30.0),
      _cpu('actor', 2, 4.0, 1.0), _cpu('actor', 2, 6.0, 3.0),  # Crashed after t = 6...
      _cpu('actor', 3, 8.0, 0.5), _cpu('actor', 3, 12.0, 2.5),  # ...and restarted at t = 8.
      dict(node='learner', kind='learner', time=5.0, step=10),
  ]
  ledger = cost.CpuLedger(records)
  assert ledger.by_node(5.0, 10.0) == pytest.approx({'actor': 1.0 + 1.5, 'server': 10.0})
  assert ledger.by_node() == pytest.approx({'actor': 5.5, 'server': 30.0})
  assert ledger.total(0.0, 4.0) == pytest.approx(8.0 + 1.0)


def test_startup_counts_the_start_of_processes_begun_in_the_window():
  records = [
      _cpu('server', 1, 0.0, 1.0), dict(_cpu('server', 1, 1.0, 4.0), event='started'),
      _cpu('learner', 2, 10.0, 0.1), dict(_cpu('learner', 2, 12.0, 3.0), event='started'),
      _cpu('learner', 2, 20.0, 9.0),
  ]
  ledger = cost.CpuLedger(records)
  assert ledger.startup() == pytest.approx(4.0 + 3.0)
  assert ledger.startup(5.0, 30.0) == pytest.approx(3.0)  # The server started before.
  assert ledger.startup(5.0, 11.0) == pytest.approx(0.1 + 2.9 / 2)  # Still starting.


def test_time_to_reward_is_the_first_evaluation_at_each_threshold_after_rl_starts():
  records = [_cpu('server', 1, 0.0, 0.0), _cpu('server', 1, 100.0, 100.0)]
  records += [dict(node='evaluator', kind='eval', time=t, reward=r, param_version=v)
              for t, r, v in ((5.0, 0.99, 0), (20.0, 0.91, 30), (30.0, 0.89, 40),
                              (40.0, 0.96, 55))]
  reached = cost.time_to_reward(records, cost.CpuLedger(records), rl_start=10.0,
                                thresholds=(0.90, 0.95, 0.99))
  assert reached['0.90'] == pytest.approx(dict(
      cpu_seconds=10.0, cpu_seconds_after_startup=10.0, wall_seconds=10.0, learner_step=30))
  assert reached['0.95'] == pytest.approx(dict(
      cpu_seconds=30.0, cpu_seconds_after_startup=30.0, wall_seconds=30.0, learner_step=55))
  assert reached['0.99'] is None


def test_duty_cycle_weighs_the_learner_windows_by_their_length():
  records = [dict(node='learner', kind='learner', duty_cycle=0.5, window_seconds=10.0),
             dict(node='learner', kind='learner', duty_cycle=1.0, window_seconds=30.0)]
  assert cost.learner_duty_cycle(records) == pytest.approx(0.875)
  assert cost.learner_duty_cycle([]) is None
