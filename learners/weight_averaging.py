"""Weight-space operations of WARP (arXiv 2406.16768) and WARM (arXiv 2401.12187).

Pure functions of parameter pytrees (every tree of one structure, leaf by leaf of equal
shape): no I/O, no training. WARM averages reward models fine-tuned from one init
(`average`); WARP merges policies RL-tuned from one init by spherical interpolation of
their task vectors `delta_m = theta_m - theta_init` (`slerp_task_vectors`), then moves the
init towards the merge (`liti`). SLERP works tensor by tensor, as mergekit does: each
leaf's task vectors are flattened and interpolated along the arc between them.
"""
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

Params = Any
# Below this sin(angle) two task vectors count as parallel, and SLERP is LERP.
_PARALLEL_SIN = 1e-6


def _check_trees(trees: Sequence[Params], what: str) -> None:
  if not trees:
    raise ValueError(f'{what} needs at least one parameter tree; got none.')
  structure = jax.tree_util.tree_structure(trees[0])
  for index, tree in enumerate(trees[1:], 1):
    if jax.tree_util.tree_structure(tree) != structure:
      raise ValueError(f'{what}: tree {index} has another structure than tree 0; merge only '
                       'models of one architecture.')
    chex.assert_trees_all_equal_shapes(trees[0], tree)


def lerp(first: Params, second: Params, weight: float) -> Params:
  """(1 - weight) * first + weight * second, leaf by leaf."""
  _check_trees([first, second], 'lerp')
  return jax.tree_util.tree_map(lambda a, b: (1 - weight) * a + weight * b, first, second)


def average(trees: Sequence[Params]) -> Params:
  """The uniform weight average (1/M) sum_m theta_m of M trees (WARM's merged model)."""
  _check_trees(trees, 'average')
  return jax.tree_util.tree_map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def task_vector(params: Params, init: Params) -> Params:
  """delta = params - init: what fine-tuning changed, leaf by leaf."""
  _check_trees([params, init], 'task_vector')
  return jax.tree_util.tree_map(jnp.subtract, params, init)


def slerp_arrays(first: jax.Array, second: jax.Array, weight: float) -> jax.Array:
  """Spherical interpolation of two arrays read as flat vectors.

  With Omega the angle between a = `first` and b = `second`:

      slerp(a, b, w) = sin((1 - w) Omega) / sin(Omega) * a + sin(w Omega) / sin(Omega) * b

  so w = 0 gives a and w = 1 gives b; for |a| = |b| the result keeps that norm and makes
  the angle w * Omega with a. Parallel vectors (sin(Omega) ~ 0) and zero vectors fall
  back to LERP (1 - w) a + w b, the limit of the formula.

  Args:
    first: [...] any shape.
    second: the same shape.
    weight: w in [0, 1].

  Returns:
    The interpolation, of `first`'s shape, in at least float32.
  """
  chex.assert_equal_shape([first, second])
  dtype = jnp.promote_types(jnp.result_type(first, second), jnp.float32)
  a = jnp.ravel(first).astype(dtype)
  b = jnp.ravel(second).astype(dtype)
  norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  cosine = jnp.clip(jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), -1.0, 1.0)
  omega = jnp.arccos(cosine)
  sine = jnp.sin(omega)
  parallel = (norms == 0) | (sine < _PARALLEL_SIN)
  safe_sine = jnp.where(parallel, 1.0, sine)
  first_coef = jnp.where(parallel, 1 - weight, jnp.sin((1 - weight) * omega) / safe_sine)
  second_coef = jnp.where(parallel, weight, jnp.sin(weight * omega) / safe_sine)
  return (first_coef * a + second_coef * b).reshape(jnp.shape(first))


def slerp(first: Params, second: Params, weight: float) -> Params:
  """`slerp_arrays` leaf by leaf (each tensor with its own angle)."""
  _check_trees([first, second], 'slerp')
  return jax.tree_util.tree_map(lambda a, b: slerp_arrays(a, b, weight), first, second)


def slerp_task_vectors(init: Params, models: Sequence[Params]) -> Params:
  """WARP's merge: theta_init + the spherical average of the task vectors theta_m - theta_init.

  Never of full weights: the vectors are taken from the shared init. M models merge
  incrementally with equal weights, delta <- slerp(delta, delta_m, 1/m) for m = 2..M
  (for M = 2: slerp(delta_1, delta_2, 1/2)); for parallel task vectors this is their
  mean, like LERP.

  Args:
    init: theta_init, the parameters every model was fine-tuned from.
    models: theta_1 .. theta_M (M >= 1), each of `init`'s structure and shapes.

  Returns:
    The merged parameters.
  """
  _check_trees([init, *models], 'slerp_task_vectors')
  merged = task_vector(models[0], init)
  for index, model in enumerate(models[1:], 2):
    merged = slerp(merged, task_vector(model, init), 1.0 / index)
  return jax.tree_util.tree_map(jnp.add, init, merged)


def liti(init: Params, merged: Params, rate: float) -> Params:
  """Linear interpolation towards the init: (1 - rate) * theta_init + rate * theta_merged.

  WARP's third step; the result is the next iteration's init (rate eta = 0.3 in the
  paper). rate = 0 keeps the init, 1 takes the merged model.
  """
  if not 0 <= rate <= 1:
    raise ValueError(f'The LITI rate must be in [0, 1]; got {rate}.')
  return lerp(init, merged, rate)
