"""One learner on device meshes: the same updates as on one device, each device a share.

The checks run in a subprocess with 8 host CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), so the rest of the suite keeps one.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


@pytest.fixture(name='sharded', scope='module')
def fixture_sharded():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          timeout=900, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_updates_on_every_mesh_give_the_parameters_of_one_device(sharded):
  for mesh in _MESHES:
    assert sharded['max_param_difference'][str(mesh)] < 1e-5, mesh
  assert sharded['params_moved'] > 2e-4  # Three real updates of about 1e-4 each happened.


def test_each_device_holds_its_share_of_parameters_and_optimizer_state(sharded):
  for mesh, share in sharded['share_per_device'].items():
    data, fsdp, tensor = json.loads(mesh.replace('(', '[').replace(')', ']'))
    # Every device the same share; about 1/fsdp (less with tensor parallelism too), plus
    # the small replicated arrays (norm scales, the value head).
    assert max(share) - min(share) < 1e-9
    assert 1 / (fsdp * tensor) - 1e-9 <= share[0] <= 1 / fsdp + 0.02, (mesh, share)
  assert sharded['share_per_device'][str((2, 4, 1))][0] < 0.27


def test_partition_rules_leave_out_axes_that_do_not_divide(sharded):
  # The tiny decoder's 53-token vocabulary cannot be split over 2 tensor shards, its 2 key
  # heads can; 64-wide embeddings split over fsdp.
  assert sharded['specs'] == {'embedder/embedding': [None, 'fsdp'],
                              'layer_0/attention/key/kernel': ['fsdp', 'tensor', None],
                              'layer_0/mlp/down/kernel': ['tensor', 'fsdp'],
                              'final_norm/scale': [None]}


def test_the_sharded_sampler_draws_the_tokens_and_log_probs_of_one_device(sharded):
  assert sharded['sampler_same_tokens']
  assert sharded['sampler_logprob_difference'] < 1e-5


def _check_sampler(params, decoder, task, rng) -> dict:
  """A server's sampler on parameters sharded over a (2, 2, 2) mesh against one device."""
  # pylint: disable=g-import-not-at-top
  import jax
  from chorus import models
  from chorus.inference_server import sampler as sampler_lib
  from chorus.models import sharding
  sample = sampler_lib.make_sampler(decoder, 16, 12)
  prompts = [task.encode_prompt(task.train_prompt(rng)) for _ in range(8)]
  tokens, mask = models.left_pad_prompts(prompts, 16)
  args = (tokens, mask, np.ones(8, np.float32), np.full(8, 12, np.int32), jax.random.PRNGKey(3))
  plain = jax.device_get(sample(params, *args))
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  on_mesh = jax.device_get(sample(sharding.shard(params, mesh), *args))
  return {'sampler_same_tokens': bool(np.array_equal(plain.tokens, on_mesh.tokens)),
          'sampler_logprob_difference': float(np.max(np.abs(plain.logprobs - on_mesh.logprobs)))}


def _check_meshes():
  """Runs in the subprocess: three V-trace updates per mesh against one device."""
  # pylint: disable=g-import-not-at-top
  import jax
  from chorus import core
  from chorus import models
  from chorus.actors import demonstrations
  from chorus.actors import reverse_digits
  from chorus.agents import builder as builder_lib
  from chorus.agents import vtrace
  from chorus.learners import learner as learner_lib
  from chorus.models import sharding

  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  spec = core.SequenceSpec(16, 12)
  batches = [demonstrations.off_policy_batch(task, rng, 16, spec) for _ in range(3)]

  def train(mesh):
    learner = vtrace.make_vtrace_learner(builder_lib.LearnerContext(
        model=decoder, sequence=spec, task=task, params=params, reference_params=params,
        # Adam turns gradients of rounding-noise size into steps of about the learning
        # rate, so a large rate would amplify the meshes' different summation orders.
        optimizer=learner_lib.make_optimizer(1e-4, 1.0), mesh=mesh), vtrace.VTraceConfig())
    for batch in batches:
      learner.update(batch)
    return learner

  single = jax.device_get(train(None).state.params)
  differences, shares = {}, {}
  for shape in _MESHES:
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    learner = train(mesh)
    got = jax.device_get(learner.state.params)
    differences[str(shape)] = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(single)))
    held = sharding.bytes_per_device((learner.state.params, learner.state.opt_state))
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(
        (learner.state.params, learner.state.opt_state)))
    shares[str(shape)] = [held[device] / total for device in mesh.devices.flat]
  specs = sharding.partition_specs(params, sharding.make_mesh(sharding.MeshConfig(2, 2, 2)))
  print(json.dumps({
      'max_param_difference': differences, 'share_per_device': shares,
      'params_moved': max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(params))),
      'specs': {name: list(specs_leaf) for name, specs_leaf in (
          ('embedder/embedding', specs['embedder']['embedding']),
          ('layer_0/attention/key/kernel', specs['layer_0']['attention']['key']['kernel']),
          ('layer_0/mlp/down/kernel', specs['layer_0']['mlp']['down']['kernel']),
          ('final_norm/scale', specs['final_norm']['scale']))},
      **_check_sampler(single, decoder, task, rng)}))


if __name__ == '__main__':
  _check_meshes()
