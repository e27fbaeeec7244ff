"""Generated tokens per second: N actors behind one batching server vs N unbatched actors.

Two set-ups on the same cores, for each number of actors N:

  seed:      one inference server process (real gRPC on 127.0.0.1, `ServedModel` with
             dynamic batching) and N actor processes, each looping over
             `InferenceClient.generate` with one random short prompt per request.
  unbatched: N actor processes, each holding the same parameters and calling the
             jitted sampler itself with batch size 1.

Every process starts, loads the model, compiles and makes one warm-up call, then
reports ready; the measured window opens only when all of them are ready, so start-up
and compilation are excluded. Each actor counts the tokens it was sent back (EOS
included, the same count in both set-ups); the request still running when the window
closes is credited for the part of it that fell inside the window.

Usage (from the repository root):

  .venv/bin/python benchmarks/inference_batching.py [--num-actors 1 4 16 32]
      [--model small] [--seconds 20] [--max-wait-ms 5 20] [--output benchmarks/RESULTS.md]

One SEED server runs per --max-wait-ms value, so the cost of the batching deadline
shows next to its benefit.

Results go into the "Inference batching" section of the output markdown file (other
sections of that file are kept). Nothing here asserts a target: it measures.
"""
import argparse
import ctypes
import dataclasses
import datetime
import multiprocessing
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

# Nothing heavy is imported at module level: children are spawned, re-import this
# module, and must set their thread limits before JAX loads.

SECTION_TITLE = 'Inference batching'
MODEL_NAME = 'policy'
# XLA:CPU's only thread knob here: without it every JAX process starts an Eigen pool of
# one thread per core, so 32 processes on 2 cores would run 64 compute threads.
# (`intra_op_parallelism_threads` is a TensorFlow session option, not an XLA flag: XLA
# ignores it in XLA_FLAGS, so it is not set.)
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false'
SINGLE_THREAD_ENV = {'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1',
                     'MKL_NUM_THREADS': '1', 'TF_CPP_MIN_LOG_LEVEL': '2'}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every process of one benchmark run needs to know."""
  model: str
  seconds: float
  max_new_tokens: int
  max_prompt_len: int
  min_prompt_tokens: int
  max_prompt_tokens: int
  temperature: float
  max_batch_size: int
  server_multi_thread: bool
  seed: int
  workdir: str  # Holds the shared parameters and the XLA compilation cache.

  @property
  def params_path(self) -> str:
    return os.path.join(self.workdir, 'params.msgpack')

  @property
  def compilation_cache_dir(self) -> str:
    return os.path.join(self.workdir, 'xla_cache')


# ----------------------------------------------------------------------------------
# Child processes.


def _die_with_parent(parent_pid: int):
  """Makes the kernel kill this process if the benchmark's parent dies, even by SIGKILL."""
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG.
  except OSError:
    pass  # Not Linux: the parent's finally block is then the only guard.
  if os.getppid() != parent_pid:  # The parent died before prctl took effect.
    os._exit(1)  # pylint: disable=protected-access


def _limit_threads(single_thread_xla: bool):
  os.environ.update(SINGLE_THREAD_ENV)
  if single_thread_xla:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} {SINGLE_THREAD_XLA_FLAGS}'.strip()


def _import_jax(settings: Settings):
  """Imports JAX with the shared compilation cache, so N actors compile once between them."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', settings.compilation_cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return jax


def _decoder_config(settings: Settings):
  from chorus import models  # pylint: disable=g-import-not-at-top
  vocab_size = models.CharTokenizer().vocab_size
  return {'tiny': models.DecoderConfig.tiny,
          'small': models.DecoderConfig.small}[settings.model](vocab_size)


def _load_params(settings: Settings):
  from chorus import models  # pylint: disable=g-import-not-at-top
  with open(settings.params_path, 'rb') as f:
    return models.params_from_bytes(f.read())


def _random_prompt(rng, vocab_size: int, settings: Settings) -> list[int]:
  """BOS and a few random non-special tokens."""
  from chorus import models  # pylint: disable=g-import-not-at-top
  length = int(rng.integers(settings.min_prompt_tokens, settings.max_prompt_tokens + 1))
  return [models.BOS_ID] + rng.integers(3, vocab_size, size=length - 1).tolist()


def _rss_bytes(pid: int | str = 'self') -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      match = re.search(r'^VmRSS:\s+(\d+) kB', f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0
  except OSError:
    return 0


def _machine_cpu_seconds() -> tuple[float, float]:
  """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
  with open('/proc/stat') as f:
    ticks = [int(value) for value in f.readline().split()[1:9]]
  idle = ticks[3] + ticks[4]  # idle + iowait
  clock_ticks = os.sysconf('SC_CLK_TCK')
  return (sum(ticks) - idle) / clock_ticks, sum(ticks) / clock_ticks


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds a process has used so far (0 once it is gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, IndexError, ValueError):
    return 0.0


def _child(target, name: str, parent_pid: int, single_thread_xla: bool, events, *args):
  """Entry of every child: thread limits first, then `target`; errors go to the parent."""
  _die_with_parent(parent_pid)
  _limit_threads(single_thread_xla)
  try:
    target(name, events, *args)
  except Exception:  # pylint: disable=broad-except
    events.put(('error', name, traceback.format_exc()))


def _prepare(name, events, settings: Settings):
  """Writes the shared random parameters and fills the compilation cache for batch 1."""
  jax = _import_jax(settings)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  config = _decoder_config(settings)
  params = models.init_params(config, jax.random.PRNGKey(settings.seed))
  with open(settings.params_path, 'wb') as f:
    f.write(models.params_to_bytes(params))
  num_params = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
  # Same flags as the unbatched actors, hence the same cache key: they then load the
  # executable instead of compiling it 32 times over on 2 cores.
  sample = sampler_lib.make_sampler(config, settings.max_prompt_len, settings.max_new_tokens)
  prompt_tokens, prompt_mask = models.left_pad_prompts([[models.BOS_ID]], settings.max_prompt_len)
  jax.device_get(sample(params, prompt_tokens, prompt_mask, np.ones(1, np.float32),
                        np.full(1, settings.max_new_tokens, np.int32), jax.random.PRNGKey(0)))
  events.put(('done', name, dict(num_params=num_params, vocab_size=config.vocab_size,
                                 config=dataclasses.asdict(config))))


def _serve(name, events, settings: Settings, max_wait_ms: float, stop_event):
  """The inference server: one ServedModel behind real gRPC on loopback."""
  _import_jax(settings)
  from chorus.inference_server import server as server_lib  # pylint: disable=g-import-not-at-top
  server_config = server_lib.InferenceServerConfig(
      max_batch_size=settings.max_batch_size, max_wait_ms=max_wait_ms,
      max_prompt_len=settings.max_prompt_len, max_new_tokens=settings.max_new_tokens,
      seed=settings.seed)
  model = server_lib.ServedModel(MODEL_NAME, _decoder_config(settings), _load_params(settings),
                                 0, server_config)
  model.warm_up()  # Compiles every batch bucket before any actor is timed.
  server, port = server_lib.start_server({MODEL_NAME: model}, '127.0.0.1:0',
                                         num_threads=server_config.num_threads)
  events.put(('ready', name, dict(port=port)))
  try:
    stop_event.wait()
  finally:
    server.stop(grace=1.0).wait()
    model.close()


def _run_window(name, events, start_event, start_time, settings: Settings, call):
  """Reports ready, waits for the common start, then calls `call()` until the window ends.

  `call()` does one request and returns the number of tokens generated. Requests that
  end inside the window count fully; the one running when it closes counts for the
  fraction of its duration inside the window.
  """
  events.put(('ready', name, {}))
  start_event.wait()
  start = start_time.value
  end = start + settings.seconds
  tokens, requests, latencies = 0.0, 0, []
  while True:
    request_start = time.monotonic()
    if request_start >= end:
      break
    generated = call()
    request_end = time.monotonic()
    if request_end <= end:
      tokens += generated
      requests += 1
      latencies.append(request_end - request_start)
    else:
      tokens += generated * (end - request_start) / (request_end - request_start)
  events.put(('result', name, dict(tokens=tokens, requests=requests, latencies=latencies,
                                   rss_bytes=_rss_bytes())))


def _served_actor(name, events, start_event, start_time, settings: Settings, address: str,
                  index: int):
  """SEED-style actor: no model here, every completion comes from the server."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import client as client_lib  # pylint: disable=g-import-not-at-top
  vocab_size = _decoder_config(settings).vocab_size
  rng = np.random.default_rng([settings.seed, index])
  client = client_lib.InferenceClient(address)
  client.wait_until_ready()

  def call() -> int:
    result = client.generate([_random_prompt(rng, vocab_size, settings)], model=MODEL_NAME,
                             max_new_tokens=settings.max_new_tokens,
                             temperature=settings.temperature)
    return len(result.completions[0].tokens)

  call()  # Opens the channel, so the first timed request does not pay for it.
  try:
    _run_window(name, events, start_event, start_time, settings, call)
  finally:
    client.close()


def _unbatched_actor(name, events, start_event, start_time, settings: Settings, index: int):
  """Actor that holds the model and samples one prompt at a time itself."""
  jax = _import_jax(settings)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  config = _decoder_config(settings)
  params = jax.device_put(_load_params(settings))
  sample = sampler_lib.make_sampler(config, settings.max_prompt_len, settings.max_new_tokens)
  rng = np.random.default_rng([settings.seed, index])
  key = jax.random.PRNGKey(settings.seed + 1 + index)
  temperature = np.full(1, settings.temperature, np.float32)
  max_new_tokens = np.full(1, settings.max_new_tokens, np.int32)
  num_calls = 0

  def call() -> int:
    nonlocal num_calls
    # Padding and the device_get mirror what the server does for each of its batches.
    prompt_tokens, prompt_mask = models.left_pad_prompts(
        [_random_prompt(rng, config.vocab_size, settings)], settings.max_prompt_len)
    output = jax.device_get(sample(params, prompt_tokens, prompt_mask, temperature,
                                   max_new_tokens, jax.random.fold_in(key, num_calls)))
    num_calls += 1
    return int(output.lengths[0])

  call()  # Compiles (or loads from the cache) before the window.
  _run_window(name, events, start_event, start_time, settings, call)


# ----------------------------------------------------------------------------------
# The parent: starts children, opens the window, collects, cleans up.


class _Children:
  """Every process this benchmark starts; `terminate()` leaves none behind."""

  def __init__(self):
    self._context = multiprocessing.get_context('spawn')
    self.events = self._context.Queue()
    self.processes: dict[str, multiprocessing.Process] = {}

  def Event(self):  # pylint: disable=invalid-name
    return self._context.Event()

  def Value(self, *args):  # pylint: disable=invalid-name
    return self._context.Value(*args)

  def start(self, name: str, target, single_thread_xla: bool, *args):
    process = self._context.Process(
        target=_child, name=name, daemon=True,
        args=(target, name, os.getpid(), single_thread_xla, self.events) + args)
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


@dataclasses.dataclass
class Measurement:
  """One set-up at one N."""
  setup: str
  num_actors: int
  tokens_per_second: float
  requests: int
  mean_latency_ms: float
  p95_latency_ms: float
  cpu_share: float  # CPU time of the set-up's processes / (window x cores).
  machine_busy: float  # Busy CPU time of the whole machine / (window x cores).
  rss_bytes: int  # All of the set-up's processes, sampled mid-window.
  server_requests: int | None = None
  server_batches: int | None = None
  server_sequences: int | None = None

  @property
  def tokens_per_cpu_second(self) -> float:
    """Tokens per CPU-second the set-up used: robust to what else runs on the machine."""
    return self.tokens_per_second / (self.cpu_share * os.cpu_count())

  @property
  def mean_batch_size(self) -> float | None:
    if not self.server_batches:
      return None
    return self.server_sequences / self.server_batches


@dataclasses.dataclass(frozen=True)
class _Server:
  label: str
  address: str
  pid: int
  status: Any  # () -> this model's GetStatus counters.


def _measure(children: _Children, settings: Settings, num_actors: int,
             server: _Server | None, ready_timeout_s: float) -> Measurement:
  """Runs N actors of one set-up (SEED through `server`, or unbatched without one)."""
  setup = server.label if server else 'unbatched'
  start_event, start_time = children.Event(), children.Value('d', 0.0)
  names = [f'{setup}-actor-{index}' for index in range(num_actors)]
  for index, name in enumerate(names):
    if server:
      children.start(name, _served_actor, True, start_event, start_time, settings,
                     server.address, index)
    else:
      children.start(name, _unbatched_actor, True, start_event, start_time, settings, index)
  try:
    children.wait_for('ready', names, ready_timeout_s)
    pids = [children.processes[name].pid for name in names] + ([server.pid] if server else [])
    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
    machine_busy_before, machine_total_before = _machine_cpu_seconds()
    status_before = server.status() if server else None
    start_time.value = start = time.monotonic()
    start_event.set()
    time.sleep(settings.seconds / 2)
    rss = sum(_rss_bytes(pid) for pid in pids)
    time.sleep(max(0.0, start + settings.seconds - time.monotonic()))
    cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before
    machine_busy, machine_total = _machine_cpu_seconds()
    status_after = server.status() if server else None
    results = children.wait_for('result', names, settings.seconds + 600)
  except BaseException:
    children.terminate(names)  # No grace on failure or Ctrl-C.
    raise
  children.stop(names)
  latencies = [latency for result in results.values() for latency in result['latencies']]
  measurement = Measurement(
      setup=setup, num_actors=num_actors,
      tokens_per_second=sum(result['tokens'] for result in results.values()) / settings.seconds,
      requests=sum(result['requests'] for result in results.values()),
      mean_latency_ms=1000 * statistics.fmean(latencies) if latencies else float('nan'),
      p95_latency_ms=(1000 * statistics.quantiles(latencies, n=20)[-1]
                      if len(latencies) >= 2 else float('nan')),
      cpu_share=cpu / (settings.seconds * os.cpu_count()),
      machine_busy=(machine_busy - machine_busy_before) / (machine_total - machine_total_before),
      rss_bytes=rss)
  if server:
    measurement.server_requests = status_after['requests'] - status_before['requests']
    measurement.server_batches = status_after['batches'] - status_before['batches']
    measurement.server_sequences = status_after['sequences'] - status_before['sequences']
  return measurement


def _machine() -> str:
  model = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpuinfo = f.read()
    fields = {key: re.search(rf'^{key}\s*:\s*(.+)$', cpuinfo, re.MULTILINE)
              for key in ('model name', 'cpu family', 'model')}
    if fields['model name']:
      model = fields['model name'].group(1).strip()
    if fields['cpu family'] and fields['model']:
      # Virtual machines often show only the brand ("AMD EPYC"); family/model date it.
      model += (f' (family {fields["cpu family"].group(1).strip()}, '
                f'model {fields["model"].group(1).strip()})')
  except OSError:
    pass
  memory = ''
  try:
    with open('/proc/meminfo') as f:
      match = re.search(r'^MemTotal:\s+(\d+) kB', f.read(), re.MULTILINE)
    memory = f', {int(match.group(1)) / 2**20:.0f} GiB RAM' if match else ''
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}'


def _seed_label(max_wait_ms: float) -> str:
  return f'SEED, max_wait_ms {max_wait_ms:g}'


def _format_section(command: str, info: dict[str, Any], settings: Settings,
                    max_wait_ms: list[float], measurements: list[Measurement]) -> str:
  config = info['config']
  lines = [
      f'## {SECTION_TITLE}',
      '',
      'Generated tokens per second of N actor processes in two set-ups on the same cores. '
      '"SEED": one inference server process (real gRPC on 127.0.0.1, `ServedModel` with '
      'dynamic batching) answers N actor processes that each loop over '
      '`InferenceClient.generate` with one prompt per request. "Unbatched": N processes '
      'that each hold the model and call the jitted sampler (`make_sampler`) with batch '
      'size 1. Same parameters, same prompt distribution; tokens counted as returned '
      '(EOS included) in both.',
      '',
      f'- Command: `{command}`',
      f'- Date: {info["date"]}',
      f'- Machine: {info["machine"]}; 1-minute load average before the run '
      f'{info["load_before"]:.2f} (the machine is shared, see "machine busy")',
      f'- Software: Python {platform.python_version()}, jax {info["jax_version"]} (CPU backend)',
      f'- Model: `DecoderConfig.{settings.model}`, {info["num_params"]:,} parameters '
      f'({config["num_layers"]} layers, width {config["embed_dim"]}, {config["num_heads"]} '
      f'query / {config["num_kv_heads"]} KV heads, vocab {config["vocab_size"]}), random '
      f'parameters (seed {settings.seed}), {config["dtype"]}',
      f'- Generation: prompts of BOS + {settings.min_prompt_tokens - 1}-'
      f'{settings.max_prompt_tokens - 1} random tokens, left-padded to '
      f'{settings.max_prompt_len}; max_new_tokens {settings.max_new_tokens}; temperature '
      f'{settings.temperature}; one prompt per request / call',
      f'- Server: max_batch_size {settings.max_batch_size}, max_wait_ms '
      f'{" and ".join(f"{w:g}" for w in max_wait_ms)} (one server each), every batch bucket '
      'compiled in warm-up; XLA '
      + ('multi-threaded (its default: one Eigen thread per core), as the one compute '
         'process on the machine' if settings.server_multi_thread
         else f'single-threaded (`{SINGLE_THREAD_XLA_FLAGS}`)'),
      f'- Actors (both set-ups): `XLA_FLAGS={SINGLE_THREAD_XLA_FLAGS}`, '
      + ', '.join(f'{k}={v}' for k, v in SINGLE_THREAD_ENV.items() if 'THREADS' in k)
      + '; processes started with multiprocessing "spawn"',
      f'- Window: {settings.seconds:g} s per measurement, opened once every process had '
      'loaded the model, compiled and made one warm-up call (start-up excluded); the request '
      'running when the window closes is credited pro rata. The set-ups alternate at each N; '
      'servers not under test stay up, idle.',
      '',
      '| Actors | Set-up | Tokens/s | vs unbatched | Tokens per CPU-s | vs unbatched '
      '| Mean latency (ms) | p95 latency (ms) | Server requests / batches | Mean batch size '
      '| CPU used / machine busy | RSS (GiB) |',
      '|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  unbatched = {m.num_actors: m for m in measurements if m.setup == 'unbatched'}
  for m in sorted(measurements, key=lambda m: (m.num_actors, m.setup != 'unbatched')):
    base = unbatched.get(m.num_actors)
    versus = lambda value, base_value: (f'{value / base_value:.2f}x'
                                        if base and m is not base else '')
    server = (f'{m.server_requests} / {m.server_batches}'
              if m.server_batches is not None else '')
    batch_size = f'{m.mean_batch_size:.1f}' if m.mean_batch_size is not None else ''
    lines.append(
        f'| {m.num_actors} | {m.setup} | {m.tokens_per_second:.0f} '
        f'| {versus(m.tokens_per_second, base and base.tokens_per_second)} '
        f'| {m.tokens_per_cpu_second:.0f} '
        f'| {versus(m.tokens_per_cpu_second, base and base.tokens_per_cpu_second)} '
        f'| {m.mean_latency_ms:.0f} | {m.p95_latency_ms:.0f} | {server} | {batch_size} '
        f'| {m.cpu_share:.0%} / {m.machine_busy:.0%} | {m.rss_bytes / 2**30:.1f} |')
  lines += [
      '',
      'Latency is per request (SEED: `generate` round trip; unbatched: one sampler call). '
      '"Server requests / batches" are the GetStatus counters\' increase during the window '
      '(requests counted on arrival, batches on completion); mean batch size is prompts per '
      'completed batch. "CPU used" is the user+system CPU time of the set-up\'s processes '
      '(server included) over window x cores; "machine busy" is the same for every process '
      'on the machine. Tokens per CPU-s = tokens/s / CPU-seconds used per second: the '
      'figure least moved by other programs sharing the machine. RSS is summed over the '
      'set-up\'s processes, sampled mid-window.',
      '',
  ]
  return '\n'.join(lines)


def _write_section(path: str, section: str):
  """Replaces this benchmark's section of `path`, keeping any other sections.

  A "### Reading" subsection (prose written by a person about a run) is kept at the end
  of the new section; its title names the run it was written for, so a rerun shows
  when the prose is older than the numbers.
  """
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if not text.strip():
    text = '# Benchmark results\n\n'
  pattern = re.compile(rf'^## {re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)',
                       re.MULTILINE | re.DOTALL)
  match = pattern.search(text)
  if match:
    reading = re.search(r'^### Reading.*', match.group(0), re.MULTILINE | re.DOTALL)
    if reading:
      section = section.rstrip('\n') + '\n\n' + reading.group(0).rstrip('\n') + '\n'
    text = text[:match.start()] + section + '\n' + text[match.end():]
  else:
    text = text.rstrip('\n') + '\n\n' + section + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')


def _print_measurement(m: Measurement):
  server = (f', server {m.server_requests} requests / {m.server_batches} batches'
            if m.server_batches is not None else '')
  print(f'  N={m.num_actors:<3d} {m.setup:22s} {m.tokens_per_second:7.0f} tokens/s, '
        f'{m.tokens_per_cpu_second:5.0f} per CPU-s, {m.requests} requests, mean latency '
        f'{m.mean_latency_ms:.0f} ms, CPU {m.cpu_share:.0%} (machine {m.machine_busy:.0%}), '
        f'RSS {m.rss_bytes / 2**30:.1f} GiB{server}', flush=True)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-actors', type=int, nargs='+', default=[1, 4, 16, 32])
  parser.add_argument('--model', choices=['tiny', 'small'], default='small')
  parser.add_argument('--seconds', type=float, default=20.0,
                      help='length of each measured window')
  parser.add_argument('--setups', nargs='+', choices=['seed', 'unbatched'],
                      default=['seed', 'unbatched'])
  parser.add_argument('--max-new-tokens', type=int, default=32)
  parser.add_argument('--max-batch-size', type=int, default=32)
  parser.add_argument('--max-wait-ms', type=float, nargs='+', default=[5.0, 20.0],
                      help='one SEED server (and measurement) per value')
  parser.add_argument('--single-thread-server', action='store_true',
                      help='give the server the actors\' one-thread XLA flag too')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--ready-timeout-s', type=float, default=900.0)
  parser.add_argument('--output', default=os.path.join(os.path.dirname(__file__), 'RESULTS.md'),
                      help='markdown file whose "Inference batching" section is rewritten; '
                      '"-" prints only')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if min(args.num_actors) < 1:
    raise SystemExit(f'--num-actors must all be >= 1, got {args.num_actors}.')
  if args.max_batch_size < max(args.num_actors):
    print(f'Note: max_batch_size {args.max_batch_size} < {max(args.num_actors)} actors: '
          'some requests will wait for a second batch.', file=sys.stderr)
  # A SIGTERM to the benchmark must still run the clean-up below.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  workdir = tempfile.mkdtemp(prefix='chorus_inference_batching_')
  settings = Settings(model=args.model, seconds=args.seconds,
                      max_new_tokens=args.max_new_tokens, max_prompt_len=16,
                      min_prompt_tokens=2, max_prompt_tokens=8, temperature=1.0,
                      max_batch_size=args.max_batch_size,
                      server_multi_thread=not args.single_thread_server, seed=args.seed,
                      workdir=workdir)
  max_wait_ms = args.max_wait_ms if 'seed' in args.setups else []
  command = ' '.join([os.path.relpath(sys.executable)] + [shlex.quote(a) for a in sys.argv])
  info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
              machine=_machine(), load_before=os.getloadavg()[0])
  measurements = []
  children = _Children()
  status_clients = []
  try:
    children.start('prepare', _prepare, True, settings)
    info.update(children.wait_for('done', ['prepare'], args.ready_timeout_s)['prepare'])
    children.stop(['prepare'])
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    info['jax_version'] = metadata.version('jax')
    print(f'{settings.model}: {info["num_params"]:,} parameters; {info["machine"]}', flush=True)

    servers, stop_servers = [], children.Event()
    if max_wait_ms:
      # Imported only now: it loads JAX, which the parent never initialises.
      from chorus.inference_server import client as client_lib  # pylint: disable=g-import-not-at-top
    for index, wait_ms in enumerate(max_wait_ms):
      name = f'server-{index}'
      children.start(name, _serve, not settings.server_multi_thread, settings, wait_ms,
                     stop_servers)
      # One at a time: two servers compiling at once would each take twice as long.
      port = children.wait_for('ready', [name], args.ready_timeout_s)[name]['port']
      status_client = client_lib.InferenceClient(f'127.0.0.1:{port}')
      status_clients.append(status_client)
      servers.append(_Server(_seed_label(wait_ms), f'127.0.0.1:{port}',
                             children.processes[name].pid,
                             lambda c=status_client: c.status()[MODEL_NAME]))
    # The set-ups alternate at each N, so that a change in the load other programs put
    # on the machine hits all of them alike.
    for num_actors in args.num_actors:
      for server in servers + (['unbatched'] if 'unbatched' in args.setups else []):
        measurement = _measure(children, settings, num_actors,
                               None if server == 'unbatched' else server,
                               args.ready_timeout_s)
        measurements.append(measurement)
        _print_measurement(measurement)
    stop_servers.set()
    children.stop([f'server-{index}' for index in range(len(servers))])
  finally:
    for status_client in status_clients:
      status_client.close()
    children.terminate()
    shutil.rmtree(workdir, ignore_errors=True)

  section = _format_section(command, info, settings, max_wait_ms, measurements)
  print()
  print(section)
  if args.output != '-':
    _write_section(args.output, section)
    print(f'Wrote the "{SECTION_TITLE}" section of {args.output}.')


if __name__ == '__main__':
  main()
