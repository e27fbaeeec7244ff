"""What the inference server and its clients share: the server's batching config and gRPC options.

Light on purpose (no JAX, no server modules): actor processes import it through the client.
"""
import dataclasses

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
    max_batch_size: most rows in one accelerator batch (also the most in one request:
      prompts times samples per prompt). A guided batch runs twice as many decoder rows
      (conditional and unconditional).
    max_wait_ms: longest a request waits for others to fill its batch.
    request_timeout_s: a Generate or Score call that waits longer fails with
      DEADLINE_EXCEEDED.
    num_threads: gRPC worker threads; at least the number of concurrent callers.
    seed: seeds the sampling random stream.
  """
  max_batch_size: int = 32
  max_wait_ms: float = 5.0
  request_timeout_s: float = 120.0
  num_threads: int = 64
  seed: int = 0

  def batch_buckets(self) -> tuple[int, ...]:
    """Padded batch sizes (powers of two up to the cap), so XLA compiles a few shapes only."""
    buckets, size = [], 1
    while size < self.max_batch_size:
      buckets.append(size)
      size *= 2
    return tuple(buckets) + (self.max_batch_size,)

  def bucket_for(self, num_rows: int) -> int:
    return next(size for size in self.batch_buckets() if size >= num_rows)
