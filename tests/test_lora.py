"""LoRA: adapters on the fly equal the merged kernels; learners train, checkpoint and push
only adapters over frozen weights."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus import schema
from chorus.actors import reverse_digits
from chorus.agents import builder as builder_lib
from chorus.agents import bond
from chorus.agents import vtrace
from chorus.inference_server import param_stream
from chorus.learners import learner as learner_lib
from chorus.models import lora
from chorus.models.decoder_config import LoraConfig

_TASK = reverse_digits.ReverseDigitsTask()
_SPEC = core.SequenceSpec(16, 12)


def _configs(**extra):
  base = dataclasses.replace(models.DecoderConfig.tiny(_TASK.tokenizer.vocab_size), **extra)
  return base, dataclasses.replace(base, lora=LoraConfig(rank=4, alpha=8.0))


def _with_random_adapters(params, seed=1):
  """Adapters with B != 0, so that they change the function."""
  frozen, adapters = lora.split(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
  noisy = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape),
                                 adapters)
  return lora.combine(frozen, noisy)


@pytest.mark.parametrize('extra', [{}, dict(use_post_attn_norm=True, use_post_ffw_norm=True,
                                            sliding_window=3, layer_types=(
                                                'sliding_attention', 'full_attention'))],
                         ids=['tiny', 'gemma2_like'])
def test_adapters_on_the_fly_give_the_logits_of_the_merged_kernels(extra):
  base_config, config = _configs(**extra)
  params = _with_random_adapters(lora.add_adapters(
      models.init_params(base_config, jax.random.PRNGKey(0)), config, jax.random.PRNGKey(2)))
  tokens = jnp.array([[1, 5, 7, 9, 11, 13, 2], [0, 0, 1, 4, 6, 8, 2]])
  mask = tokens > 0
  positions = models.positions_from_mask(mask)
  on_the_fly = models.Decoder(config).apply({'params': params}, tokens, positions, mask)
  merged = models.Decoder(lora.without_lora(config)).apply(
      {'params': lora.merge(params, config)}, tokens, positions, mask)
  without = models.Decoder(base_config).apply({'params': lora.split(params)[0]}, tokens,
                                              positions, mask)
  np.testing.assert_allclose(on_the_fly.logits, merged.logits, atol=1e-4)
  np.testing.assert_allclose(on_the_fly.values, merged.values, atol=1e-4)
  assert float(jnp.max(jnp.abs(on_the_fly.logits - without.logits))) > 1e-2  # They act.


def test_fresh_adapters_change_nothing():
  base_config, config = _configs()
  base = models.init_params(base_config, jax.random.PRNGKey(0))
  params = lora.add_adapters(base, config, jax.random.PRNGKey(1))
  tokens = jnp.array([[1, 5, 7, 2]])
  mask = tokens > 0
  logits = lambda cfg, p: models.Decoder(cfg).apply(  # pylint: disable=g-long-lambda
      {'params': p}, tokens, models.positions_from_mask(mask), mask).logits
  np.testing.assert_array_equal(logits(config, params), logits(base_config, base))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  trajectories = []
  for _ in range(8):
    prompt = _TASK.train_prompt(rng)
    completion = _TASK.demonstration(prompt, rng)
    trajectories.append(core.Trajectory(
        np.asarray(_TASK.encode_prompt(prompt), np.int32), np.asarray(completion, np.int32),
        -np.ones(len(completion), np.float32), float(rng.random()), True, 0,
        extras=dict(anchor_logprobs=-np.ones(len(completion), np.float32),
                    best_anchor_tokens=np.asarray(completion, np.int32),
                    anchor_win_rate=0.5)))
  return bond.BondBuilder(bond.BondConfig()).schema().batch_trajectories(trajectories, _SPEC)


@pytest.mark.parametrize('make', [
    lambda context: vtrace.make_vtrace_learner(context, vtrace.VTraceConfig()),
    lambda context: bond.make_bond_learner(context, bond.BondConfig())], ids=['vtrace', 'bond'])
def test_a_learner_trains_checkpoints_and_pushes_only_adapters(make):
  base_config, config = _configs()
  params = lora.add_adapters(models.init_params(base_config, jax.random.PRNGKey(0)), config,
                             jax.random.PRNGKey(1))
  learner = make(builder_lib.LearnerContext(
      model=config, sequence=_SPEC, task=_TASK, params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(1e-2, 1.0)))
  assert learner.trains_adapters
  frozen, adapters = lora.split(params)
  for _ in range(3):
    learner.update(_batch())
  # The checkpointed state: adapters and their optimiser state; aux trees (BOND's anchor)
  # mirror the policy as adapters too.
  state_names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(
      (learner.state.params, learner.state.aux))[0]}
  assert state_names == set(lora.ADAPTER_NAMES)
  moved = lora.split(learner.full_params())
  jax.tree_util.tree_map(np.testing.assert_array_equal, moved[0], frozen)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(moved[1]), jax.tree_util.tree_leaves(adapters))) > 1e-4
  for pushed in learner.published_params().values():
    assert jax.tree_util.tree_structure(pushed) == jax.tree_util.tree_structure(adapters)


def _push_bytes(tree) -> int:
  return sum(len(param_stream.decode_chunk(message).data)
             for message in param_stream.push_chunks(tree, model='p', version=1))


def test_a_lora_push_is_the_adapters_bytes_only():
  base_config, config = _configs()
  params = lora.add_adapters(models.init_params(base_config, jax.random.PRNGKey(0)), config,
                             jax.random.PRNGKey(1))
  frozen, adapters = lora.split(params)
  full, adapters_only = _push_bytes(params), _push_bytes(adapters)
  assert adapters_only == 4 * lora.num_parameters(adapters)
  assert full == 4 * (lora.num_parameters(adapters) + lora.num_parameters(frozen))
  assert full / adapters_only > 10


def test_a_server_merges_pushed_adapters_into_its_frozen_weights():
  # pylint: disable=g-import-not-at-top
  from chorus.inference_server.client import ParameterPublisher
  from chorus.inference_server.config import InferenceServerConfig
  from chorus.inference_server.served_model import ServedModel
  from chorus.inference_server.service import start_server
  base_config, config = _configs()
  base = models.init_params(base_config, jax.random.PRNGKey(0))
  trained = _with_random_adapters(lora.add_adapters(base, config, jax.random.PRNGKey(1)))
  frozen, adapters = lora.split(trained)
  served = ServedModel('policy', base_config, base, version=0, config=InferenceServerConfig(),
                       sequence=_SPEC, pushed_adapters=config.lora)
  assert [layout.path for layout in served.tensor_layout] == [
      path for path, _ in param_stream.tensors(adapters)]
  server, port = start_server({'policy': served}, '127.0.0.1:0')
  try:
    with ParameterPublisher(f'127.0.0.1:{port}', model='policy') as publisher:
      publisher.publish(adapters, 1)
      with pytest.raises(Exception, match='not newer'):
        publisher.publish(adapters, 1)
  finally:
    server.stop(grace=None).wait()
    served.close()
  params, version = served.params_and_version()
  assert version == 1
  expected = lora.merge(trained, config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(base)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                         jax.tree_util.tree_leaves(base))]
  assert max(moved) > 1e-2
