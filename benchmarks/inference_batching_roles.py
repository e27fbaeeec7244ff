"""What each child process of the inference batching benchmark runs.

Every role is `role(name, events, *args)`, started by `inference_batching_processes.Children`:

  prepare:         writes the shared random parameters, fills the compilation cache.
  serve:           the inference server: one ServedModel behind real gRPC on loopback,
                   batching with the dynamic batcher or the continuous scheduler.
  served_actor:    a SEED actor, asking the server for every completion.
  unbatched_actor: an actor that holds the model and samples one prompt at a time.

Every actor asks for completions of mixed lengths: each request's max_new_tokens is drawn
uniformly from [min_new_tokens, max_new_tokens] (random weights rarely sample EOS early).

Nothing heavy is imported at module level: spawned children import this module and
must set their thread limits before JAX loads.
"""
import dataclasses
import os
import time

from chorus.benchmarks import inference_batching_processes as processes

MODEL_NAME = 'policy'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every process of one benchmark run needs to know."""
  model: str
  seconds: float
  min_new_tokens: int
  max_new_tokens: int
  max_prompt_len: int
  min_prompt_tokens: int
  max_prompt_tokens: int
  temperature: float
  prompts_per_request: int
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


@dataclasses.dataclass(frozen=True)
class ServerSettings:
  """One server set-up: `scheduler` 'dynamic' (uses max_wait_ms) or 'continuous' (uses
  decode_steps_per_call)."""
  scheduler: str
  max_wait_ms: float = 5.0
  decode_steps_per_call: int = 1

  @property
  def label(self) -> str:
    if self.scheduler == 'dynamic':
      return f'dynamic, max_wait_ms {self.max_wait_ms:g}'
    return f'continuous, {self.decode_steps_per_call} step(s)/call'


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


def _random_request(rng, vocab_size: int, settings: Settings) -> tuple[list[list[int]], int]:
  """(prompts_per_request prompts of BOS and a few random non-special tokens, one
  max_new_tokens in the settings' range)."""
  from chorus import models  # pylint: disable=g-import-not-at-top
  prompts = []
  for _ in range(settings.prompts_per_request):
    length = int(rng.integers(settings.min_prompt_tokens, settings.max_prompt_tokens + 1))
    prompts.append([models.BOS_ID] + rng.integers(3, vocab_size, size=length - 1).tolist())
  return prompts, int(rng.integers(settings.min_new_tokens, settings.max_new_tokens + 1))


def prepare(name, events, settings: Settings):
  """Writes the shared random parameters and fills the compilation cache for the
  unbatched actors' batch (prompts_per_request)."""
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
  batch = settings.prompts_per_request
  prompt_tokens, prompt_mask = models.left_pad_prompts([[models.BOS_ID]] * batch,
                                                       settings.max_prompt_len)
  jax.device_get(sample(params, prompt_tokens, prompt_mask, np.ones(batch, np.float32),
                        np.full(batch, settings.max_new_tokens, np.int32),
                        jax.random.PRNGKey(0)))
  events.put(('done', name, dict(num_params=num_params, vocab_size=config.vocab_size,
                                 config=dataclasses.asdict(config))))


def serve(name, events, settings: Settings, server_settings: ServerSettings, stop_event):
  """The inference server: one ServedModel behind real gRPC on loopback. It compiles for
  itself: with the persistent cache on, the scheduler would not donate its slots
  (inference_server/slots.py), and the server would not be the one measured."""
  # pylint: disable=g-import-not-at-top
  from chorus import core
  from chorus.inference_server.config import InferenceServerConfig
  from chorus.inference_server.served_model import ServedModel
  from chorus.inference_server.service import start_server
  # pylint: enable=g-import-not-at-top
  server_config = InferenceServerConfig(
      scheduler=server_settings.scheduler, max_batch_size=settings.max_batch_size,
      max_wait_ms=server_settings.max_wait_ms,
      decode_steps_per_call=server_settings.decode_steps_per_call, seed=settings.seed)
  sequence = core.SequenceSpec(prompt_len=settings.max_prompt_len,
                               completion_len=settings.max_new_tokens)
  model = ServedModel(MODEL_NAME, _decoder_config(settings), _load_params(settings), 0,
                      server_config, sequence)
  model.warm_up()  # Compiles every batch or insert bucket before any actor is timed.
  server, port = start_server({MODEL_NAME: model}, '127.0.0.1:0',
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
                                   rss_bytes=processes.rss_bytes())))


def served_actor(name, events, start_event, start_time, settings: Settings, address: str,
                 index: int):
  """SEED-style actor: no model here, every completion comes from the server."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import client as client_lib  # pylint: disable=g-import-not-at-top
  vocab_size = _decoder_config(settings).vocab_size
  rng = np.random.default_rng([settings.seed, index])
  client = client_lib.InferenceClient(address)
  client.wait_until_ready()

  def call() -> int:
    prompts, max_new_tokens = _random_request(rng, vocab_size, settings)
    result = client.generate(prompts, model=MODEL_NAME, max_new_tokens=max_new_tokens,
                             temperature=settings.temperature)
    return sum(len(completion.tokens) for completion in result.completions)

  call()  # Opens the channel, so the first timed request does not pay for it.
  try:
    _run_window(name, events, start_event, start_time, settings, call)
  finally:
    client.close()


def unbatched_actor(name, events, start_event, start_time, settings: Settings, index: int):
  """Actor that holds the model and samples one request's prompts at a time itself."""
  jax = _import_jax(settings)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  config = _decoder_config(settings)
  params = jax.device_put(_load_params(settings))
  sample = sampler_lib.make_sampler(config, settings.max_prompt_len, settings.max_new_tokens)
  rng = np.random.default_rng([settings.seed, index])
  key = jax.random.PRNGKey(settings.seed + 1 + index)
  temperature = np.full(settings.prompts_per_request, settings.temperature, np.float32)
  num_calls = 0

  def call() -> int:
    nonlocal num_calls
    # Padding and the device_get mirror what the server does for each of its batches.
    prompts, max_new_tokens = _random_request(rng, config.vocab_size, settings)
    prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, settings.max_prompt_len)
    output = jax.device_get(sample(params, prompt_tokens, prompt_mask, temperature,
                                   np.full(len(prompts), max_new_tokens, np.int32),
                                   jax.random.fold_in(key, num_calls)))
    num_calls += 1
    return int(output.lengths.sum())

  call()  # Compiles (or loads from the cache) before the window.
  _run_window(name, events, start_event, start_time, settings, call)
