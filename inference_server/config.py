"""What the inference server and its clients share: the server's batching config and gRPC options.

Light on purpose (no JAX, no server modules): actor processes import it through the client.
"""
import dataclasses

from chorus import core
from chorus.inference_server import tls

SCHEDULERS = ('continuous', 'dynamic')

# Generate and Score messages are small, and parameter pushes stream in chunks of a few
# MiB (param_stream.py): nothing needs more, so nothing larger is even read.
MAX_MESSAGE_BYTES = 16 << 20
GRPC_OPTIONS = [('grpc.max_send_message_length', MAX_MESSAGE_BYTES),
                ('grpc.max_receive_message_length', MAX_MESSAGE_BYTES)]


@dataclasses.dataclass(frozen=True)
class InferenceServerConfig:
  """How one inference server batches and times out requests.

  Prompt and completion lengths are the experiment's `core.SequenceSpec`, given to each
  `ServedModel` beside this config.

  Attributes:
    scheduler: how generation is batched. 'dynamic' (the default): requests gathered into
      a batch (size cap and `max_wait_ms` deadline) that decodes until its longest row is
      done, on one parameter version. 'continuous': `max_batch_size` decoding slots;
      between decode steps finished rows leave and waiting rows are prefilled into free
      slots (inference_server/scheduler.py); a push mid-completion switches the row's
      remaining tokens to the new version. Cheaper per token when many rows of mixed
      lengths are in flight; with the 16 rows of the default run one dynamic batch
      holds them all for less CPU (benchmarks/RESULTS.md).
    max_batch_size: most rows decoding at once: the continuous scheduler's slots, the
      dynamic batcher's largest batch (and, for both, the most rows in one request:
      prompts times samples per prompt). A guided row runs two decoder rows
      (conditional and unconditional).
    max_wait_ms: longest a request waits for others to fill its batch (dynamic
      generation and scoring).
    decode_steps_per_call: continuous scheduler only: most decode steps between two
      chances for rows to leave and join. More saves host round trips per token; fewer
      frees finished rows' slots sooner. 2 gave the most tokens per CPU-second at 32
      actors (1, 2 and 4 measured: benchmarks/RESULTS.md, "Inference batching").
    request_timeout_s: a Generate or Score call that waits longer fails with
      DEADLINE_EXCEEDED.
    num_threads: gRPC worker threads; at least the number of concurrent callers.
    cpu_cores: 0 (the default): the server process runs on every core it may use. N > 0:
      on N of them (its CPU affinity, set before it computes; Linux), server i of a
      machine on the i-th run of N cores, wrapping around. XLA:CPU sizes its thread pool
      from that, so on a CPU host that the server shares with its actors 1 gives the
      most tokens per CPU-second: 20-26 % more than the default with
      the continuous scheduler at 32 actors, for 16-20 % fewer tokens per second
      (benchmarks/RESULTS.md, "A server on one core"). No effect on the device of a
      GPU or TPU server beyond its host threads.
    seed: seeds the sampling random stream.
    tls_dir: '' (the default) serves plaintext, which is enough on one machine's loopback.
      For a cluster: a directory holding server.crt, server.key and ca.crt (PEM). The
      servers serve TLS with the certificate, and every client verifies it against
      ca.crt (tls.py). The path must hold the files on every machine of the run.
  """
  scheduler: str = 'dynamic'
  max_batch_size: int = 32
  max_wait_ms: float = 5.0
  decode_steps_per_call: int = 2
  request_timeout_s: float = 120.0
  num_threads: int = 64
  cpu_cores: int = 0
  seed: int = 0
  tls_dir: str = ''

  def __post_init__(self):
    if self.scheduler not in SCHEDULERS:
      raise ValueError(f'inference.scheduler must be one of {SCHEDULERS}; got '
                       f'{self.scheduler!r}.')
    if self.max_batch_size < 1 or self.decode_steps_per_call < 1:
      raise ValueError(f'inference.max_batch_size ({self.max_batch_size}) and '
                       f'inference.decode_steps_per_call ({self.decode_steps_per_call}) must be '
                       'at least 1.')
    core.check_ranges(self, 'inference', max_wait_ms=(0, None), request_timeout_s=(1e-3, None),
                      num_threads=(1, None), cpu_cores=(0, None))
    missing = tls.missing_files(self.tls_dir) if self.tls_dir else []
    if missing:
      raise ValueError(f'inference.tls_dir={self.tls_dir!r} lacks {", ".join(missing)}; it '
                       f'needs {", ".join(tls.FILES)} (PEM), or leave it empty for plaintext.')

  def batch_buckets(self) -> tuple[int, ...]:
    """Padded batch sizes (powers of two up to the cap), so XLA compiles a few shapes only."""
    buckets, size = [], 1
    while size < self.max_batch_size:
      buckets.append(size)
      size *= 2
    return tuple(buckets) + (self.max_batch_size,)

  def bucket_for(self, num_rows: int) -> int:
    return next(size for size in self.batch_buckets() if size >= num_rows)
