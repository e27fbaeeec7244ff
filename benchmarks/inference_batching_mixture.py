"""Nash-MD's geometric-mixture sampling with KV caches against a no-cache re-run of both models.

The cached sampler (`sampler.make_mixture_sampler`, the inference server's mixture
sampler) keeps one KV cache per model, so each new token costs one decoder step per
model. The baseline re-runs the whole prefix (prompt and every token so far) through both
models for each new token, as TRL's Nash-MD mixture does (its GeometricMixtureWrapper calls
both models without a cache). Both draw each row's token k with the same key from the
same normalised mixture softmax(((1 - b) * l + b * l_ref) / T), so they sample the same
tokens up to float rounding; the measurement reports how many rows agree.

The re-run pads each prefix up to a multiple of `BUCKET` tokens, so XLA compiles a few
shapes instead of one per length (compiled before timing): that adds about BUCKET / 2
tokens to each re-run, which flatters the cache a little (about 10 % at 128 new tokens).

`measure_role` runs in a child process of inference_batching.py; nothing heavy is
imported at module level.
"""
import dataclasses
import time

BUCKET = 16


@dataclasses.dataclass(frozen=True)
class MixtureSettings:
  model: str
  batch_size: int
  prompt_len: int
  new_tokens: tuple[int, ...]
  mixture_coef: float
  repeats: int
  seed: int


def _no_cache_sampler(config, prompt_len: int, max_new_tokens: int, example_args):
  """`sample(params, ref_params, coef, prompt_tokens, prompt_mask, temperature, rng) ->
  (tokens [B, T], lengths [B])`, each token from a full cache-free pass of both models
  over the prefix; every prefix length's step is compiled here, before any timing."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from chorus.models import tokenizer  # pylint: disable=g-import-not-at-top
  decoder = models.Decoder(config)
  total = prompt_len + max_new_tokens

  def step(length, params, ref_params, coef, tokens, mask, temperature, keys, lengths, done,
           index):
    """Draws token `index` of every row from both models' pass over tokens[:, :length]."""
    prefix, prefix_mask = tokens[:, :length], mask[:, :length]
    positions = models.positions_from_mask(prefix_mask)
    logits = [decoder.apply({'params': p}, prefix, positions, prefix_mask).logits
              [:, prompt_len + index - 1] for p in (params, ref_params)]
    mixed = (1 - coef)[:, None] * logits[0] + coef[:, None] * logits[1]
    token, _ = sampler_lib.draw(mixed, temperature, keys, index)
    active = ~done
    tokens = tokens.at[:, prompt_len + index].set(jnp.where(active, token, tokenizer.PAD_ID))
    mask = mask.at[:, prompt_len + index].set(active)
    lengths = lengths + active
    done = done | (active & (token == tokenizer.EOS_ID)) | (lengths >= max_new_tokens)
    return tokens, mask, lengths, done

  lengths_used = sorted({min(total, -(-(prompt_len + index) // BUCKET) * BUCKET)
                         for index in range(max_new_tokens)})
  compiled = {length: jax.jit(step, static_argnums=0).lower(length, *example_args).compile()
              for length in lengths_used}

  def sample(params, ref_params, coef, prompt_tokens, prompt_mask, temperature, rng):
    batch = prompt_tokens.shape[0]
    pad = jnp.zeros((batch, max_new_tokens), jnp.int32)
    tokens = jnp.concatenate([jnp.asarray(prompt_tokens), pad], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask), pad.astype(bool)], axis=1)
    lengths, done = jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool)
    keys = sampler_lib.row_keys(rng, batch)
    for index in range(max_new_tokens):
      length = min(total, -(-(prompt_len + index) // BUCKET) * BUCKET)
      tokens, mask, lengths, done = compiled[length](
          params, ref_params, coef, tokens, mask, temperature, keys, lengths, done,
          jnp.int32(index))
      if bool(done.all()):
        break
    return tokens[:, prompt_len:], lengths

  return sample


def _timed(call, repeats: int) -> tuple[float, float, object]:
  """(wall seconds, CPU seconds of this process, output) per call, after one warm call."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(call())
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    output = jax.block_until_ready(call())
  return ((time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats,
          output)


def measure(settings: MixtureSettings) -> list[dict]:
  """One row per number of new tokens: cached and no-cache seconds per call of a batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from chorus import models  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  vocab_size = models.CharTokenizer().vocab_size
  config = getattr(models.DecoderConfig, settings.model)(vocab_size)
  config = dataclasses.replace(config, max_seq_len=max(
      config.max_seq_len, settings.prompt_len + max(settings.new_tokens)))
  params = models.init_params(config, jax.random.PRNGKey(settings.seed))
  ref_params = models.init_params(config, jax.random.PRNGKey(settings.seed + 1))
  rng = np.random.default_rng(settings.seed)
  prompts = [[models.BOS_ID] + rng.integers(3, vocab_size, rng.integers(1, 8)).tolist()
             for _ in range(settings.batch_size)]
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, settings.prompt_len)
  coef = np.full(settings.batch_size, settings.mixture_coef, np.float32)
  temperature = np.ones(settings.batch_size, np.float32)
  key = jax.random.PRNGKey(settings.seed + 2)
  rows = []
  for new_tokens in settings.new_tokens:
    cached = sampler_lib.make_mixture_sampler(config, config, settings.prompt_len, new_tokens)
    max_new = np.full(settings.batch_size, new_tokens, np.int32)
    cached_wall, cached_cpu, cached_out = _timed(
        lambda: cached(params, ref_params, coef, prompt_tokens, prompt_mask, temperature,
                       max_new, key), settings.repeats)
    batch = settings.batch_size
    example = (params, ref_params, coef,
               np.zeros((batch, settings.prompt_len + new_tokens), np.int32),
               np.zeros((batch, settings.prompt_len + new_tokens), bool), temperature,
               sampler_lib.row_keys(key, batch), np.zeros(batch, np.int32),
               np.zeros(batch, bool), np.int32(0))
    no_cache = _no_cache_sampler(config, settings.prompt_len, new_tokens, example)
    # One timed call: a no-cache call is long enough to time alone, and warming it up
    # first would double the benchmark's longest part (compilation is already done).
    wall, cpu = time.perf_counter(), time.process_time()
    tokens, lengths = jax.device_get(no_cache(params, ref_params, coef, prompt_tokens,
                                              prompt_mask, temperature, key))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    same = [np.array_equal(cached_out.tokens[row, :cached_out.lengths[row]],
                           tokens[row, :lengths[row]]) for row in range(batch)]
    rows.append(dict(model=settings.model, batch_size=batch, new_tokens=new_tokens,
                     generated_tokens=int(cached_out.lengths.sum()),
                     cached_wall_s=cached_wall, cached_cpu_s=cached_cpu,
                     no_cache_wall_s=wall, no_cache_cpu_s=cpu, same_rows=int(sum(same))))
  return rows


def measure_role(name, events, settings: MixtureSettings):
  """Child-process entry (see inference_batching_processes.Children.start)."""
  events.put(('done', name, measure(settings)))
