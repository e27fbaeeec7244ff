"""One measurement of the inference batching benchmark: one set-up at one number of actors.

The parent starts the actors, opens the window for all of them at once when every one is
ready, and meters the set-up's processes (the server included) while it is open.
"""
import dataclasses
import os
import statistics
import time
from typing import Any

from chorus.benchmarks import inference_batching_processes as processes
from chorus.benchmarks import inference_batching_roles as roles


@dataclasses.dataclass
class Measurement:
  """One set-up at one N."""
  setup: str
  num_actors: int
  tokens_per_second: float
  requests: int
  p50_latency_ms: float
  p95_latency_ms: float
  cpu_share: float  # CPU time of the set-up's processes / (window x cores).
  server_share: float | None  # The server's part of that CPU time (None: unbatched).
  machine_busy: float  # Busy CPU time of the whole machine / (window x cores).
  rss_bytes: int  # All of the set-up's processes, sampled mid-window.
  server_requests: int | None = None
  server_batches: int | None = None
  server_sequences: int | None = None
  server_tokens: int | None = None
  server_row_steps: int | None = None  # Rows x decode steps computed, idle ones included.
  server_compilations: int | None = None  # During the window; 0 after a good warm-up.

  @property
  def tokens_per_cpu_second(self) -> float:
    """Tokens per CPU-second the set-up used: robust to what else runs on the machine."""
    return self.tokens_per_second / (self.cpu_share * os.cpu_count())

  @property
  def fill(self) -> float | None:
    """Generated tokens per decoder row-step the server computed: the share of batch rows
    (dynamic) or slots (continuous) doing useful work, step by step."""
    if not self.server_row_steps:
      return None
    return self.server_tokens / self.server_row_steps


@dataclasses.dataclass(frozen=True)
class Server:
  """A SEED server as the measurements see it."""
  label: str
  address: str
  pid: int
  status: Any  # () -> this model's GetStatus counters.


def measure(children: processes.Children, settings: roles.Settings, num_actors: int,
            server: Server | None, ready_timeout_s: float) -> Measurement:
  """Runs N actors of one set-up (SEED through `server`, or unbatched without one)."""
  setup = server.label if server else 'unbatched'
  start_event, start_time = children.Event(), children.Value('d', 0.0)
  names = [f'{setup}-actor-{index}' for index in range(num_actors)]
  for index, name in enumerate(names):
    if server:
      children.start(name, roles.served_actor, True, start_event, start_time, settings,
                     server.address, index)
    else:
      children.start(name, roles.unbatched_actor, True, start_event, start_time, settings, index)
  try:
    children.wait_for('ready', names, ready_timeout_s)
    pids = [children.processes[name].pid for name in names] + ([server.pid] if server else [])
    cpu_before = [processes.cpu_seconds(pid) for pid in pids]
    machine_busy_before, machine_total_before = processes.machine_cpu_seconds()
    status_before = server.status() if server else None
    start_time.value = start = time.monotonic()
    start_event.set()
    time.sleep(settings.seconds / 2)
    rss = sum(processes.rss_bytes(pid) for pid in pids)
    time.sleep(max(0.0, start + settings.seconds - time.monotonic()))
    cpu = [processes.cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before)]
    machine_busy, machine_total = processes.machine_cpu_seconds()
    status_after = server.status() if server else None
    results = children.wait_for('result', names, settings.seconds + 600)
  except BaseException:
    children.terminate(names)  # No grace on failure or Ctrl-C.
    raise
  children.stop(names)
  latencies = sorted(latency for result in results.values() for latency in result['latencies'])
  measurement = Measurement(
      setup=setup, num_actors=num_actors,
      tokens_per_second=sum(result['tokens'] for result in results.values()) / settings.seconds,
      requests=sum(result['requests'] for result in results.values()),
      p50_latency_ms=1000 * statistics.median(latencies) if latencies else float('nan'),
      p95_latency_ms=(1000 * statistics.quantiles(latencies, n=20)[-1]
                      if len(latencies) >= 2 else float('nan')),
      cpu_share=sum(cpu) / (settings.seconds * os.cpu_count()),
      server_share=cpu[-1] / sum(cpu) if server else None,
      machine_busy=(machine_busy - machine_busy_before) / (machine_total - machine_total_before),
      rss_bytes=rss)
  if server:
    measurement.server_requests = status_after['requests'] - status_before['requests']
    measurement.server_batches = status_after['batches'] - status_before['batches']
    for field, counter in (('server_sequences', 'sequences'), ('server_tokens', 'generated_tokens'),
                           ('server_row_steps', 'decoded_row_steps'),
                           ('server_compilations', 'compilations')):
      setattr(measurement, field, status_after[counter] - status_before[counter])
  return measurement
