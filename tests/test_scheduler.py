"""The continuous (decode-step) scheduler: same completions alone or joined, exact log-probs,
no recompilation after warm-up, parameter swaps mid-decode; per-request seeds through gRPC."""
import functools
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.lanes import Row
from chorus.inference_server.scheduler import ContinuousLane
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server

VOCAB_SIZE = 37
SEQUENCE = core.SequenceSpec(prompt_len=8, completion_len=12)
NUM_SLOTS = 4
CONFIG = InferenceServerConfig(scheduler='continuous', max_batch_size=NUM_SLOTS,
                               decode_steps_per_call=1, request_timeout_s=120.0)
NULL_CAPTION = 30
_TIMEOUT_S = 120.0


class _Model:
  """A LaneModel whose parameters switch to `later` from its `swap_at`-th read on."""

  def __init__(self, name, params, version=1, later=None, swap_at=None):
    self.name, self.kind = name, 'decoder'
    self.decoder_config = models.DecoderConfig.tiny(VOCAB_SIZE)
    self.config, self.sequence = CONFIG, SEQUENCE
    self._params, self._version, self._later, self._swap_at = params, version, later, swap_at
    self.reads = 0
    self.counters = {}

  def params_and_version(self):
    self.reads += 1
    if self._swap_at is not None and self.reads > self._swap_at:
      return self._later, self._version + 1
    return self._params, self._version

  def count(self, **increments):
    for key, value in increments.items():
      self.counters[key] = self.counters.get(key, 0) + value


@functools.cache
def _params(seed):
  return models.init_params(models.DecoderConfig.tiny(VOCAB_SIZE), jax.random.PRNGKey(seed))


# (prompt, unconditional prompt, max_new_tokens, temperature, coef) of each request's rows;
# requests 0 and 2 sample twice per prompt. Mixed lengths, so rows leave at different steps.
REQUESTS = [
    [([1, 5, 6], [1, NULL_CAPTION], 12, 1.0, 0.3)] * 2,
    [([1, 6, 7, 8, 9, 10, 11, 12], [1, NULL_CAPTION, 31], 3, 0.7, -1.0)],
    [([1, 13, 14, 15], [1, 33], 9, 1.5, 0.5), ([1], [1, NULL_CAPTION], 9, 1.5, 0.5)] * 2,
    [([1, 20, 21], [1, NULL_CAPTION], 12, 1.0, 0.8)],
    [([1, 22], [1, 29], 5, 0.9, 0.6)],
]
KINDS = ('plain', 'mixture', 'guided')


def _rows(kind, request_index):
  return [Row(prompt, max_new, temperature, 0.0 if kind == 'plain' else coef,
              unconditional if kind == 'guided' else None, (7, request_index), index)
          for index, (prompt, unconditional, max_new, temperature, coef)
          in enumerate(REQUESTS[request_index])]


def _lane(kind):
  model = _Model('policy', _params(0))
  second = {'plain': None, 'mixture': _Model('reference', _params(1)), 'guided': model}[kind]
  return ContinuousLane(model, second), model


def _send(lane, model, kind, request_indices, stagger):
  """Each request's results and the lane calls they took; with `stagger`, each request
  after the first is sent once the lane has run two more calls, so it joins rows that
  are already decoding."""
  calls_before = model.counters.get('batches', 0)
  futures = []
  for request_index in request_indices:
    if stagger and futures:
      calls = model.counters.get('batches', 0)
      while model.counters.get('batches', 0) < calls + 2 and not futures[0].done():
        time.sleep(0.001)
    futures.append(lane.submit(_rows(kind, request_index)))
  results = [future.result(_TIMEOUT_S) for future in futures]
  return results, model.counters['batches'] - calls_before


@pytest.fixture(scope='module', params=KINDS)
def joined_and_alone(request):
  """(kind, the results of all requests sent while others decode, the calls they took
  together; each request's results when it ran alone on the same lane, and the calls
  they took one after another)."""
  kind = request.param
  lane, model = _lane(kind)
  try:
    joined, joined_calls = _send(lane, model, kind, range(len(REQUESTS)), stagger=True)
    alone = [_send(lane, model, kind, [index], stagger=False)
             for index in range(len(REQUESTS))]
  finally:
    lane.close()
  return (kind, joined, joined_calls, [results[0] for results, _ in alone],
          sum(calls for _, calls in alone))


@functools.cache
def _whole_batch_sampler(kind):
  config = models.DecoderConfig.tiny(VOCAB_SIZE)
  if kind == 'plain':
    return sampler_lib.make_sampler(config, SEQUENCE.prompt_len, SEQUENCE.completion_len)
  return sampler_lib.make_paired_sampler(config, config if kind == 'mixture' else None,
                                         SEQUENCE.prompt_len, SEQUENCE.completion_len)


def _one_request_sampler(kind, request_index):
  """The whole-batch sampler (`make_sampler` / `make_paired_sampler`) on one request's
  rows alone, with the request's key: the reference the scheduler must reproduce."""
  sample = _whole_batch_sampler(kind)
  rows = _rows(kind, request_index)
  prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in rows],
                                                       SEQUENCE.prompt_len)
  temperature = np.array([row.temperature for row in rows], np.float32)
  max_new = np.array([row.max_new_tokens for row in rows], np.int32)
  key = np.array(rows[0].key, np.uint32)
  if kind == 'plain':
    output = sample(_params(0), prompt_tokens, prompt_mask, temperature, max_new, key)
  else:
    second = models.left_pad_prompts([row.second_prompt or row.prompt for row in rows],
                                     SEQUENCE.prompt_len)
    output = sample(_params(0), _params(1), np.array([row.coef for row in rows], np.float32),
                    prompt_tokens, prompt_mask, *second, temperature, max_new, key)
  output = jax.device_get(output)
  return [(output.tokens[i, :output.lengths[i]], output.logprobs[i, :output.lengths[i]])
          for i in range(len(rows))]


def test_joining_a_running_batch_changes_no_completion(joined_and_alone):
  kind, joined, joined_calls, alone, alone_calls = joined_and_alone
  # The requests really shared decode calls.
  assert joined_calls < alone_calls
  for request_index, (together, by_itself) in enumerate(zip(joined, alone)):
    reference = _one_request_sampler(kind, request_index)
    for row, (result, single, (tokens, logprobs)) in enumerate(zip(together, by_itself,
                                                                   reference)):
      # The same compiled slot functions, the request alone: bit for bit.
      np.testing.assert_array_equal(result.tokens, single.tokens)
      np.testing.assert_array_equal(result.logprobs, single.logprobs)
      # The whole-batch sampler with the request's key: same tokens; log-probs to float
      # rounding, since XLA may order a matmul's sums differently for another shape.
      np.testing.assert_array_equal(result.tokens, tokens, err_msg=f'{kind} {request_index} {row}')
      np.testing.assert_allclose(result.logprobs, logprobs, atol=1e-5)
      assert result.param_version == result.newest_param_version == 1


def _forward_logprobs(params, prompts, completions, temperature):
  """log softmax(logits / T) [B, T, V] of one cache-free pass per row."""
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, SEQUENCE.prompt_len)
  tokens, mask = models.right_pad_completions(completions, SEQUENCE.completion_len)
  logits, _ = models.forward_completions(models.DecoderConfig.tiny(VOCAB_SIZE), params,
                                         prompt_tokens, prompt_mask, tokens, mask)
  return logits, tokens


def test_logprobs_are_the_normalised_distribution_at_the_sampled_tokens(joined_and_alone):
  kind, joined, _, _, _ = joined_and_alone
  for request_index, results in enumerate(joined):
    rows = _rows(kind, request_index)
    completions = [result.tokens for result in results]
    logits, tokens = _forward_logprobs(_params(0), [r.prompt for r in rows], completions, 1)
    if kind != 'plain':
      # (1 - b) * first + b * second: the mixture's second model, or guidance's
      # unconditional prompt (b = 1 - g); both normalised by the softmax below.
      second, _ = _forward_logprobs(_params(1) if kind == 'mixture' else _params(0),
                                    [r.second_prompt or r.prompt for r in rows], completions,
                                    1)
      coef = np.array([r.coef for r in rows], np.float32)[:, None, None]
      logits = (1 - coef) * logits + coef * second
    temperature = np.array([r.temperature for r in rows], np.float32)[:, None, None]
    log_probs = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    expected = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    for row, result in enumerate(results):
      assert 1 <= len(result.tokens) <= rows[row].max_new_tokens
      np.testing.assert_allclose(result.logprobs, expected[row, :len(result.tokens)],
                                 atol=1e-4)


def test_no_recompilation_after_warm_up_across_many_batches_of_mixed_lengths():
  served = {name: ServedModel(name, models.DecoderConfig.tiny(VOCAB_SIZE), _params(seed), 1,
                              CONFIG, SEQUENCE) for name, seed in (('policy', 0), ('ref', 1))}
  policy = served['policy']
  try:
    policy.add_mixture(served['ref'])
    policy.add_guidance()
    policy.warm_up()
    warm = policy.counters_snapshot()['compilations']
    assert warm >= 2 * 3  # decode and at least two insert buckets, for each of three lanes
    rng = np.random.default_rng(0)
    futures = []
    for index in range(60):
      rows = [Row([1] + rng.integers(3, VOCAB_SIZE, rng.integers(0, 7)).tolist(),
                  int(rng.integers(1, SEQUENCE.completion_len + 1)),
                  float(rng.uniform(0.5, 2.0)), float(rng.uniform(0, 1)), None, (index, 0), i)
              for i in range(int(rng.integers(1, NUM_SLOTS + 1)))]
      submit = (policy.submit, lambda r: policy.submit_mixture(served['ref'], r),
                policy.submit_guided)[index % 3]
      futures.append(submit(rows))
      if index == 30:  # A push as the learner sends it: a fresh tree from msgpack.
        policy.update_params(models.params_from_bytes(models.params_to_bytes(_params(2))), 2)
      if index % 7 == 0:
        time.sleep(0.05)  # Lets some batches run part-full.
    for future in futures:
      assert len(future.result(_TIMEOUT_S)) >= 1
    counters = policy.counters_snapshot()
    assert counters['compilations'] == warm
    assert counters['sequences'] == sum(len(f.result()) for f in futures)
  finally:
    for model in served.values():
      model.close()


def test_parameter_swap_mid_decode_keeps_every_row_and_rows_that_span_it_say_so():
  old, new = _params(0), _params(5)
  swap_at = 4  # Reads 1-4 see version 1, later reads version 2.
  model = _Model('policy', old, version=1, later=new, swap_at=swap_at)
  lane = ContinuousLane(model)
  prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11]]
  rows = [Row(prompt, SEQUENCE.completion_len, 1.0, key=(3, 0), index=i)
          for i, prompt in enumerate(prompts)]
  try:
    results = lane.submit(rows).result(_TIMEOUT_S)
    late = lane.submit(rows[:1]).result(_TIMEOUT_S)
  finally:
    lane.close()
  # Read k (from 1) inserts and draws token 0 and decodes token 1 (k = 1), or decodes token
  # k (k > 1): tokens 0..swap_at come from version 1, the rest from version 2.
  swapped = swap_at + 1
  long_rows = [r for r in results if len(r.tokens) > swapped]
  assert long_rows, 'no row outlived the swap; lower swap_at'
  for row, result in enumerate(results):
    assert result.param_version == 1
    assert result.newest_param_version == (2 if len(result.tokens) > swapped else 1)
    old_logits, tokens = _forward_logprobs(old, [prompts[row]], [result.tokens], 1)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(old_logits, -1)),
                                  tokens[..., None], -1)[0, :, 0]
    np.testing.assert_allclose(result.logprobs[:swapped], expected[:min(swapped,
                                                                        len(result.tokens))],
                               atol=1e-4)
    if len(result.tokens) > swapped:
      # The first token after the swap: the new parameters read token swapped - 1 and
      # attend to the keys and values the old ones wrote for everything before it.
      decode = sampler_lib.decoder_logits(model.decoder_config)
      cache_len = SEQUENCE.prompt_len + SEQUENCE.completion_len
      prompt_tokens, prompt_mask = models.left_pad_prompts([prompts[row]], SEQUENCE.prompt_len)
      prefix = result.tokens[None, :swapped - 1]
      _, state = decode.prefill(old, np.concatenate([prompt_tokens, prefix], 1),
                                np.concatenate([prompt_mask, prefix > -1], 1), cache_len)
      logits, _ = decode.step(new, state, result.tokens[None, swapped - 1:swapped],
                              np.ones((1, 1), bool), SEQUENCE.prompt_len + swapped - 1)
      hybrid = jax.nn.log_softmax(logits[0])[result.tokens[swapped]]
      np.testing.assert_allclose(result.logprobs[swapped], hybrid, atol=1e-4)
      assert abs(result.logprobs[swapped] - expected[swapped]) > 1e-3
  assert late[0].param_version == late[0].newest_param_version == 2


@pytest.mark.slow
def test_the_swap_test_passes_again_on_executables_from_a_persistent_compilation_cache(
    tmp_path):
  # jax 0.4.34's CPU executables loaded from its persistent cache gave wrong log-probs with
  # the slots' state donated (the test above failed on the second run); slots.py then
  # does not donate. Two runs in new processes: the first compiles, the second loads.
  environment = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  test = (f'{__file__}::'
          'test_parameter_swap_mid_decode_keeps_every_row_and_rows_that_span_it_say_so')
  for run in ('compiles', 'loads from the cache'):
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                             test], env=environment, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, (run, result.stdout[-3000:])
  assert os.listdir(tmp_path), 'nothing was cached: the test compared nothing'


@pytest.mark.parametrize('scheduler', ['continuous', 'dynamic'])
def test_seeded_request_gets_the_same_completions_alone_and_among_other_traffic(scheduler):
  config = InferenceServerConfig(scheduler=scheduler, max_batch_size=8, max_wait_ms=20.0,
                                 request_timeout_s=_TIMEOUT_S)
  model = ServedModel('policy', models.DecoderConfig.tiny(VOCAB_SIZE), _params(0), 1, config,
                      SEQUENCE)
  server, port = start_server({'policy': model})
  address = f'127.0.0.1:{port}'
  prompts = [[1, 5, 6], [1, 9]]
  try:
    with InferenceClient(address, timeout_s=_TIMEOUT_S) as client:
      client.wait_until_ready(_TIMEOUT_S)
      alone = client.generate(prompts, num_samples=2, temperature=1.3, seed=11)
      stop, errors = threading.Event(), []

      def other_traffic(index):
        try:
          with InferenceClient(address, timeout_s=_TIMEOUT_S) as other:
            while not stop.is_set():
              other.generate([[1, 3 + index]], max_new_tokens=1 + index * 3)
        except Exception as error:  # pylint: disable=broad-except
          errors.append(error)

      threads = [threading.Thread(target=other_traffic, args=(i,)) for i in range(3)]
      for thread in threads:
        thread.start()
      try:
        time.sleep(0.2)
        busy = [client.generate(prompts, num_samples=2, temperature=1.3, seed=11)
                for _ in range(3)]
        other_seed = client.generate(prompts, num_samples=2, temperature=1.3, seed=12)
      finally:
        stop.set()
        for thread in threads:
          thread.join(_TIMEOUT_S)
      assert not errors
  finally:
    server.stop(grace=None)
    model.close()
  for result in busy:
    for completion, reference in zip(result.completions, alone.completions):
      np.testing.assert_array_equal(completion.tokens, reference.tokens)
      np.testing.assert_allclose(completion.logprobs, reference.logprobs, atol=1e-5)
      assert completion.param_version == completion.newest_param_version == 1
  # A prompt's samples are distinct draws, and another seed draws others.
  assert not np.array_equal(alone.completions[0].tokens, alone.completions[1].tokens)
  assert any(not np.array_equal(a.tokens, b.tokens)
             for a, b in zip(alone.completions, other_seed.completions))


def test_unknown_scheduler_is_refused_with_the_choices():
  with pytest.raises(ValueError, match=r"one of \('continuous', 'dynamic'\); got 'fifo'"):
    InferenceServerConfig(scheduler='fifo')
