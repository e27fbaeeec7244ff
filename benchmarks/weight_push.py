"""Parameter push bandwidth: a learner's streamed pushes to inference servers on loopback.

For each tree size and number of servers, N server processes each serve one model of
that size (a one-layer decoder whose embedding holds nearly all of it), and this process
pushes `--pushes` new versions to all of them, each to all servers at once, one thread
per server, as the learner's background publisher does. Reported per push after the
first two (which allocate the servers' buffers for two versions; later pushes reuse
them, as a learner's do once running): wall seconds, GB/s (bytes of one tree x servers /
wall), the CPU-seconds of this process and of the servers; then the first push's GB/s,
and the servers' peak RSS against the tree size (the server assembles beside the served
copy).

Usage (from the repository root):

  .venv/bin/python benchmarks/weight_push.py [--sizes-gb 0.1 1 4] [--servers 1 4]
      [--pushes 5] [--wire-dtype float32|bfloat16] [--max-total-gb 12]
      [--output benchmarks/RESULTS.md]

Combinations whose memory (tree x (servers x 2 + 1)) exceeds --max-total-gb are skipped
and listed. Results go into the "Weight push" section of the output file, with a second
table: the bytes of a LoRA push (adapters only, `--lora-rank`) against a full push, for
the `small` model and the Gemma 2 2B architecture (counted from shapes; nothing pushed),
and a third: the cost of merging a push's adapters once against generating with them
applied on the fly.
"""
import argparse
import concurrent.futures
import os
import resource
import sys
import time

from chorus.benchmarks import results

_EMBED = 8192
# A server's first two pushes allocate its buffers for two versions (param_stream's
# HostBuffers); later pushes reuse them. The mean per push leaves these two out.
_FILLING_PUSHES = 2
SECTION_TITLE = 'Weight push'


def _decoder_config(size_bytes: float):
  from chorus import models  # pylint: disable=g-import-not-at-top
  vocab = max(8, int(size_bytes / (4 * _EMBED)))
  return models.DecoderConfig(vocab_size=vocab, num_layers=1, embed_dim=_EMBED, num_heads=1,
                              num_kv_heads=1, head_dim=8, mlp_dim=8, max_seq_len=16)


def _zeros(config):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _serve(size_bytes: float, port_file: str):
  """Server process: serves a model of about `size_bytes` until killed."""
  # pylint: disable=g-import-not-at-top
  from chorus import core
  from chorus.inference_server.config import InferenceServerConfig
  from chorus.inference_server.served_model import ServedModel
  from chorus.inference_server.service import start_server
  config = _decoder_config(size_bytes)
  served = ServedModel('policy', config, _zeros(config), version=0,
                       config=InferenceServerConfig(max_batch_size=1),
                       sequence=core.SequenceSpec(4, 4))
  _, port = start_server({'policy': served}, '127.0.0.1:0')
  with open(port_file + '.tmp', 'w') as file:
    file.write(str(port))
  os.replace(port_file + '.tmp', port_file)
  while True:
    time.sleep(3600)


def _peak_rss_bytes(pid: int) -> int:
  with open(f'/proc/{pid}/status') as file:
    for line in file:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return 0


def _measure(size_gb: float, num_servers: int, wire_dtype: str, pushes: int,
             workdir: str) -> dict:
  # pylint: disable=g-import-not-at-top
  import subprocess
  import jax
  import numpy as np
  from chorus.inference_server.client import ParameterPublisher
  size_bytes = size_gb * 1e9
  port_files = [os.path.join(workdir, f'port_{size_gb}_{index}') for index in range(num_servers)]
  servers = [subprocess.Popen([sys.executable, __file__, '--serve', str(size_bytes), port_file],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for port_file in port_files]
  try:
    while not all(os.path.exists(path) for path in port_files):
      if any(server.poll() is not None for server in servers):
        raise RuntimeError('A server process died while starting.')
      time.sleep(0.5)
    addresses = [f'127.0.0.1:{open(path).read()}' for path in port_files]
    params = jax.tree_util.tree_map(np.ones_like, _zeros(_decoder_config(size_bytes)))
    tree_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    publishers = [ParameterPublisher(address, timeout_s=3600, wire_dtype=wire_dtype)
                  for address in addresses]
    for publisher in publishers:
      publisher.wait_until_ready(600)
    def cpu_seconds():  # (this process, the servers together)
      self_usage = resource.getrusage(resource.RUSAGE_SELF)
      return (self_usage.ru_utime + self_usage.ru_stime,
              sum(results.process_cpu_seconds(server.pid) for server in servers))

    measured = []  # (wall, client CPU-s, servers CPU-s) per push
    with concurrent.futures.ThreadPoolExecutor(num_servers) as pool:
      for version in range(1, pushes + 1):
        cpu_before, start = cpu_seconds(), time.monotonic()
        list(pool.map(lambda publisher: publisher.publish(params, version), publishers))
        wall, cpu_after = time.monotonic() - start, cpu_seconds()
        measured.append((wall, cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]))
    wall, client_cpu, server_cpu = np.mean(measured[_FILLING_PUSHES:] or measured, axis=0)
    return dict(
        size_gb=tree_bytes / 1e9, servers=num_servers, wire_dtype=wire_dtype or 'float32',
        wall_s=wall, gb_per_s=tree_bytes * num_servers / wall / 1e9,
        client_cpu_s=client_cpu, server_cpu_s=server_cpu,
        first_gb_per_s=tree_bytes * num_servers / measured[0][0] / 1e9,
        server_peak_rss_x=max(_peak_rss_bytes(s.pid) for s in servers) / tree_bytes)
  finally:
    for server in servers:
      server.kill()
      server.wait()


def _table(rows: list[dict]) -> str:
  lines = ['| tree GB | servers | on the wire | wall s | GB/s | client CPU-s | servers CPU-s | '
           'first push GB/s | server peak RSS / tree |',
           '|---:|---:|:---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['size_gb']:.2f} | {r['servers']} | {r['wire_dtype']} | "
                 f"{r['wall_s']:.2f} | {r['gb_per_s']:.2f} | {r['client_cpu_s']:.2f} | "
                 f"{r['server_cpu_s']:.2f} | {r['first_gb_per_s']:.2f} | "
                 f"{r['server_peak_rss_x']:.2f} |")
  return '\n'.join(lines)


def _lora_bytes(rank: int) -> str:
  """Markdown table: push bytes of adapters against the whole tree, float32 on the wire."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.models import lora  # pylint: disable=g-import-not-at-top
  lines = ['| model | LoRA rank | full push MB | adapters push MB | full / adapters |',
           '|:---|---:|---:|---:|---:|']
  for name, config in (('small (char vocab)', models.DecoderConfig.small(64)),
                       ('Gemma 2 2B', models.DecoderConfig.gemma2_2b())):
    adapted = dataclasses.replace(config, lora=models.LoraConfig(rank=rank))
    shapes = jax.eval_shape(lambda rng, c=adapted: models.init_params(c, rng),
                            jax.random.PRNGKey(0))
    frozen, adapters = lora.split(shapes)
    size = lambda tree: sum(int(np.prod(leaf.shape)) * 4
                            for leaf in jax.tree_util.tree_leaves(tree))
    full, only = size(frozen), size(adapters)
    lines.append(f'| {name} | {rank} | {full / 1e6:,.1f} | {only / 1e6:,.2f} | '
                 f'{full / only:,.0f}x |')
  return '\n'.join(lines)


def _lora_serving(rank: int, repeats: int = 3) -> str:
  """Markdown table: a server merging pushed adapters once against applying them on the fly.

  The `small` model, batch 32, prompts of 16 tokens, 32 new tokens; best of `repeats`
  timed calls after compilation, wall and CPU seconds of this process.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from chorus.models import lora  # pylint: disable=g-import-not-at-top
  base = models.DecoderConfig.small(64)
  adapted = dataclasses.replace(base, lora=models.LoraConfig(rank=rank))
  params = lora.add_adapters(models.init_params(base, jax.random.PRNGKey(0)), adapted,
                             jax.random.PRNGKey(1))
  frozen, adapters = lora.split(params)
  adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
  merge = jax.jit(lambda frozen, adapters: lora.merge(lora.combine(frozen, adapters), adapted))
  prompts = np.ones((32, 16), np.int32), np.ones((32, 16), bool)
  sample_args = (np.ones(32, np.float32), np.full(32, 32, np.int32), jax.random.PRNGKey(2))

  def timed(function, *args):
    jax.block_until_ready(function(*args))  # Compiles.
    best = (float('inf'), float('inf'))
    for _ in range(repeats):
      cpu, start = time.process_time(), time.perf_counter()
      jax.block_until_ready(function(*args))
      best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best

  merged_params = merge(frozen, adapters)
  rows = [('merge the adapters of one push', timed(merge, frozen, adapters)),
          ('generate, merged kernels', timed(sampler_lib.make_sampler(base, 16, 32),
                                             merged_params, *prompts, *sample_args)),
          ('generate, adapters on the fly', timed(sampler_lib.make_sampler(adapted, 16, 32),
                                                  lora.combine(frozen, adapters), *prompts,
                                                  *sample_args))]
  lines = [f'| `small`, LoRA rank {rank} | wall s | CPU-s |', '|:---|---:|---:|']
  lines += [f'| {name} | {wall:.3f} | {cpu:.3f} |' for name, (wall, cpu) in rows]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes-gb', type=float, nargs='+', default=[0.1, 1.0, 4.0])
  parser.add_argument('--servers', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--pushes', type=int, default=5,
                      help='versions pushed per combination; the mean leaves out the first '
                      'two, and the first is reported apart')
  parser.add_argument('--wire-dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--max-total-gb', type=float, default=12.0,
                      help='skip combinations needing more memory than this in all')
  parser.add_argument('--lora-rank', type=int, default=8)
  parser.add_argument('--output', default='benchmarks/RESULTS.md', help="'-' only prints")
  parser.add_argument('--serve', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.serve:
    _serve(float(args.serve[0]), args.serve[1])
    return 0
  import tempfile  # pylint: disable=g-import-not-at-top
  load = results.load_average()
  rows, skipped = [], []
  with tempfile.TemporaryDirectory() as workdir:
    for size in args.sizes_gb:
      for servers in args.servers:
        if size * (2 * servers + 1) > args.max_total_gb:
          skipped.append(f'{size} GB x {servers} servers')
          continue
        rows.append(_measure(size, servers,
                             '' if args.wire_dtype == 'float32' else args.wire_dtype,
                             args.pushes, workdir))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
  text = '\n'.join([
      f'## {SECTION_TITLE}', '',
      f'- Command: `.venv/bin/python benchmarks/weight_push.py {" ".join(argv or sys.argv[1:])}`',
      results.date_machine_load(load, results.load_average()),
      '- Each server process serves a one-layer decoder holding the tree; pushes go to all '
      'servers at once, one thread each (as the learner\'s background publisher), in 4 MiB '
      f'chunks; GB/s counts the bytes of one tree times the servers. {args.pushes} pushes '
      f'per row: wall, GB/s and CPU-s are the mean per push after the first '
      f'{_FILLING_PUSHES} (which allocate the servers\' buffers for two versions); the first '
      'push\'s GB/s has a column of its own.',
      '', _table(rows), ''] + ([f'Skipped for memory: {", ".join(skipped)}.', '']
                               if skipped else []) + [
      'LoRA pushes carry only the adapters (attention and MLP projections):', '',
      _lora_bytes(args.lora_rank), '',
      'Serving pushed adapters: merged into the kernels once per push (what the servers do) '
      'against applied on the fly in every decode step (batch 32, 16 + 32 tokens):', '',
      _lora_serving(args.lora_rank), ''])
  if args.output != '-':
    results.write_section(args.output, SECTION_TITLE, text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
