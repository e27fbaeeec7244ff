"""Runs one node of a program in this process: `python -m chorus.launch.worker RUN_DIR NODE`.

The launcher writes RUN_DIR/config.json and RUN_DIR/nodes/NODE.json (role and resolved
kwargs). SIGTERM or SIGINT asks the node to stop; it finishes its current step, closes
its files and exits 0. The node's CPU time goes to metrics.jsonl every few seconds and
when it ends (launch/cost.py).
"""
import importlib
import json
import logging
import os
import signal
import sys
import threading


def node_spec_path(run_dir: str, node: str) -> str:
  return os.path.join(run_dir, 'nodes', f'{node}.json')


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print('usage: python -m chorus.launch.worker RUN_DIR NODE', file=sys.stderr)
    return 2
  run_dir, node = argv[1], argv[2]
  # Handlers first: a stop that arrives while TF and JAX import still ends cleanly.
  stop = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *unused: stop.set())
  logging.basicConfig(level=logging.INFO, format=f'%(asctime)s {node} %(levelname)s %(message)s')
  # pylint: disable=g-import-not-at-top  (slow imports: TF and JAX)
  from chorus.launch import cost
  from chorus.launch import run_dir as layout
  # Before the slow imports, so that the node's start-up is part of what it costs.
  meter = cost.CpuMeter(layout.metrics_path(run_dir), node)
  from chorus.launch import experiment
  from chorus.launch import nodes
  with open(os.path.join(run_dir, 'config.json')) as file:
    config = experiment.load_experiment(json.load(file))
  with open(node_spec_path(run_dir, node)) as file:
    spec = json.load(file)
  logging.info('starting role %s with %s', spec['role'], spec['kwargs'])
  for module in nodes.SLOW_IMPORTS.get(spec['role'], ()):
    importlib.import_module(module)
  meter.mark_started()
  try:
    nodes.ENTRY_POINTS[spec['role']](config, run_dir, stop.is_set, **spec['kwargs'])
  finally:
    meter.stop()
  logging.info('done')
  return 0


if __name__ == '__main__':
  code = main(sys.argv)
  # The node has closed its files and servers. Skip the interpreter's teardown of
  # TensorFlow and JAX: about 1 CPU-second per node, spent after the meter's last sample.
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
