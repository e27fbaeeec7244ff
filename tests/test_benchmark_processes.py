"""The inference batching benchmark's children: thread limits reach the child before its work."""
import os

import pytest

from chorus.benchmarks import inference_batching_processes as processes


def report_threads(name, events):
  """A child's target: reports the cores it may run on and its XLA flags."""
  events.put(('threads', name, (sorted(os.sched_getaffinity(0)),
                                os.environ.get('XLA_FLAGS', ''))))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs two cores to tell')
def test_a_one_core_child_runs_on_one_core_and_others_keep_every_core():
  children = processes.Children()
  try:
    children.start('one_core', report_threads, True, one_core=True)
    children.start('every_core', report_threads, False)
    found = children.wait_for('threads', ['one_core', 'every_core'], timeout_s=120)
  finally:
    children.terminate()
  allowed = sorted(os.sched_getaffinity(0))
  assert found['one_core'] == ([allowed[0]], processes.SINGLE_THREAD_XLA_FLAGS)
  assert found['every_core'][0] == allowed
  assert processes.SINGLE_THREAD_XLA_FLAGS not in found['every_core'][1]
