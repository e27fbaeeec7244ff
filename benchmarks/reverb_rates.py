"""Reverb insert and sample rates of the default experiment's trajectory rows.

A Reverb server (the replay node's tables, `replay.tables.make_tables`, as a queue large
enough to hold everything) runs in a child process; this process inserts rows through
the actors' `TrajectoryWriter` (1, 4 and 16 trajectories per flush: an actor's request
is one flush), then reads them all back through the learner's `batch_iterator`. Rates are
rows per second and rows per CPU-second of both processes together (the server's CPU
read from /proc).

Usage (from the repository root):

  .venv/bin/python benchmarks/reverb_rates.py [--rows 4000] [--output benchmarks/RESULTS.md | -]
"""
import argparse
import multiprocessing
import resource
import shlex
import sys
import time

import numpy as np

from chorus import core
from chorus.benchmarks import results
from chorus.configs import text_vtrace

SECTION_TITLE = 'Reverb insert and sample rates'
_TABLE_SIZE = 1_000_000


def _serve(port_queue, stop_event):
  # pylint: disable=g-import-not-at-top  (the child imports what it needs itself)
  import dataclasses
  import reverb
  from chorus.replay import tables
  config = text_vtrace.get_config()
  replay = dataclasses.replace(config.replay, max_size=_TABLE_SIZE)
  server = reverb.Server(tables.make_tables(replay, config.builder().schema(), config.sequence))
  port_queue.put(server.port)
  stop_event.wait()
  server.stop()


def _trajectories(count: int, spec: core.SequenceSpec) -> list[core.Trajectory]:
  """Trajectories of the default task's sizes: prompts of 8-12 tokens, completions of 4-12."""
  rng = np.random.default_rng(0)
  trajectories = []
  for index in range(count):
    length = int(rng.integers(4, spec.completion_len + 1))
    trajectories.append(core.Trajectory(
        prompt_tokens=rng.integers(2, 50, int(rng.integers(8, 13))).astype(np.int32),
        completion_tokens=rng.integers(2, 50, length).astype(np.int32),
        behaviour_logprobs=-rng.exponential(size=length).astype(np.float32),
        reward=float(rng.uniform()), terminated=True, param_version=index, temperature=1.0,
        model_name='policy', prompt_id=str(index), actor_id=0, episode_id=index,
        task='reverse_digits', seed=0, reward_components={'reward': 0.5}))
  return trajectories


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _rate(rows: int, wall: float, client_cpu: float, server_cpu: float) -> dict:
  return dict(rows=rows, rows_per_second=rows / wall,
              rows_per_cpu_second=rows / (client_cpu + server_cpu),
              client_cpu_us_per_row=1e6 * client_cpu / rows,
              server_cpu_us_per_row=1e6 * server_cpu / rows)


def measure(num_rows: int, flush_sizes: tuple[int, ...]) -> dict:
  # pylint: disable=g-import-not-at-top  (TF loads only here, not in the spawned child's parent)
  from chorus.replay import batch_iterator
  from chorus.replay import TrajectoryWriter
  config = text_vtrace.get_config()
  schema, spec = config.builder().schema(), config.sequence
  context = multiprocessing.get_context('spawn')
  port_queue, stop_event = context.Queue(), context.Event()
  child = context.Process(target=_serve, args=(port_queue, stop_event), daemon=True)
  child.start()
  try:
    address = f'localhost:{port_queue.get(timeout=300)}'
    trajectories = _trajectories(num_rows, spec)
    writer = TrajectoryWriter(address, config.replay.table, schema, spec)
    writer.write(trajectories[:16])  # Warm-up: the connection and the writer's structure.
    inserted = {}
    for flush_size in flush_sizes:
      cpu, server, wall = _cpu_seconds(), results.process_cpu_seconds(child.pid), time.monotonic()
      for start in range(0, num_rows, flush_size):
        writer.write(trajectories[start:start + flush_size])
      inserted[flush_size] = _rate(num_rows, time.monotonic() - wall, _cpu_seconds() - cpu,
                                   results.process_cpu_seconds(child.pid) - server)
    writer.close()
    batch_size = config.learner.batch_size
    batches = batch_iterator(address, config.replay.table, batch_size, schema, spec)
    next(batches)  # Warm-up: the dataset pipeline starts.
    stored = 16 + num_rows * len(flush_sizes) - batch_size
    num_batches = stored // batch_size
    cpu, server, wall = _cpu_seconds(), results.process_cpu_seconds(child.pid), time.monotonic()
    for _ in range(num_batches):
      next(batches)
    sampled = _rate(num_batches * batch_size, time.monotonic() - wall, _cpu_seconds() - cpu,
                    results.process_cpu_seconds(child.pid) - server)
  finally:
    stop_event.set()
    child.join(timeout=30)
  return dict(inserted=inserted, sampled=sampled, batch_size=batch_size,
              row_bytes=sum(np.prod(shape, dtype=int) * np.dtype(dtype).itemsize
                            for shape, dtype in schema.row_specs(spec).values()))


def _format_section(command: str, result: dict, load_before: float, load_after: float) -> str:
  config = text_vtrace.get_config()
  lines = [
      f'## {SECTION_TITLE}',
      '',
      'Rows of the default experiment (`configs/text_vtrace.py`: prompt_len '
      f'{config.sequence.prompt_len}, completion_len {config.sequence.completion_len}, the '
      f'V-trace schema: {result["row_bytes"]} bytes a row) written by the actors\' '
      '`TrajectoryWriter` into the replay node\'s queue table (made large) in a child '
      'process, then read back by the learner\'s `batch_iterator` in batches of '
      f'{result["batch_size"]}. Per CPU-second counts both processes.',
      '',
      f'- Command: `{command}`',
      results.date_machine_load(load_before, load_after),
      '',
      '| operation | rows | rows/s | rows per CPU-s | client CPU-us per row '
      '| server CPU-us per row |',
      '|:---|---:|---:|---:|---:|---:|',
  ]
  rows = [(f'insert, {size} per flush', rate) for size, rate in result['inserted'].items()]
  rows.append((f'sample, batches of {result["batch_size"]}', result['sampled']))
  lines += [f'| {name} | {r["rows"]} | {r["rows_per_second"]:,.0f} | '
            f'{r["rows_per_cpu_second"]:,.0f} | {r["client_cpu_us_per_row"]:.0f} | '
            f'{r["server_cpu_us_per_row"]:.0f} |' for name, r in rows]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=4000, help='rows inserted per flush size')
  parser.add_argument('--flush-sizes', type=int, nargs='+', default=[1, 4, 16])
  parser.add_argument('--output', default=results.RESULTS_PATH, help='markdown file, or -')
  args = parser.parse_args(argv)
  load_before = results.load_average()
  result = measure(args.rows, tuple(args.flush_sizes))
  command = ' '.join(['.venv/bin/python', 'benchmarks/reverb_rates.py'] +
                     [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
  section = _format_section(command, result, load_before, results.load_average())
  print(section)
  if args.output != '-':
    results.write_section(args.output, SECTION_TITLE, section)


if __name__ == '__main__':
  main()
