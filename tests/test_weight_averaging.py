"""Weight-space merging (learners/weight_averaging.py) against independent numpy forms."""
import jax
import numpy as np
import pytest

from chorus.learners import weight_averaging


def _angle(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
  return float(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def _numpy_slerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
  """Slerp by rotating a in the plane of a and b (Gram-Schmidt), norms interpolated."""
  a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
  unit_a = a64 / np.linalg.norm(a64)
  orthogonal = b64 - (b64 @ unit_a) * unit_a
  unit_orthogonal = orthogonal / np.linalg.norm(orthogonal)
  omega = _angle(a, b)
  # The formula's result, written in the (unit_a, unit_orthogonal) basis.
  coef_a = np.sin((1 - w) * omega) / np.sin(omega)
  coef_b = np.sin(w * omega) / np.sin(omega)
  along = coef_a * np.linalg.norm(a64) + coef_b * (b64 @ unit_a)
  across = coef_b * (b64 @ unit_orthogonal)
  return (along * unit_a + across * unit_orthogonal).reshape(a.shape)


def test_slerp_of_equal_norm_vectors_keeps_the_norm_and_turns_by_the_weight():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(7, 5)).astype(np.float32)
  b = rng.normal(size=(7, 5)).astype(np.float32)
  b *= np.linalg.norm(a) / np.linalg.norm(b)
  omega = _angle(a, b)
  for w in (0.0, 0.25, 0.5, 0.8, 1.0):
    result = np.asarray(weight_averaging.slerp_arrays(a, b, w))
    assert np.linalg.norm(result) == pytest.approx(np.linalg.norm(a), rel=1e-5)
    assert _angle(result, a) == pytest.approx(w * omega, abs=1e-3)
    assert _angle(result, b) == pytest.approx((1 - w) * omega, abs=1e-3)


def test_slerp_matches_a_rotation_in_the_plane_of_both_vectors():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 4)).astype(np.float32)
  b = 3.0 * rng.normal(size=(3, 4)).astype(np.float32)
  for w in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(weight_averaging.slerp_arrays(a, b, w), _numpy_slerp(a, b, w),
                               rtol=1e-4, atol=1e-5)


def test_slerp_of_parallel_vectors_is_lerp():
  a = np.arange(1.0, 7.0, dtype=np.float32)
  for b in (2.5 * a, a):
    for w in (0.0, 0.3, 1.0):
      np.testing.assert_allclose(weight_averaging.slerp_arrays(a, b, w), (1 - w) * a + w * b,
                                 rtol=1e-6)
  zero = np.zeros(6, np.float32)
  np.testing.assert_allclose(weight_averaging.slerp_arrays(zero, a, 0.4), 0.4 * a, rtol=1e-6)


def test_slerp_of_orthogonal_vectors_differs_from_lerp():
  a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
  np.testing.assert_allclose(weight_averaging.slerp_arrays(a, b, 0.5),
                             [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def _trees(seed: int, count: int):
  rng = np.random.default_rng(seed)
  return [{'w': rng.normal(size=(4, 3)).astype(np.float32),
           'b': {'x': rng.normal(size=(5,)).astype(np.float32)}} for _ in range(count)]


def test_task_vectors_are_differences_from_the_init():
  init, model = _trees(2, 2)
  delta = weight_averaging.task_vector(model, init)
  np.testing.assert_allclose(delta['w'], model['w'] - init['w'])
  np.testing.assert_allclose(delta['b']['x'], model['b']['x'] - init['b']['x'])


def test_merge_interpolates_task_vectors_from_the_init_not_full_weights():
  init, first, second = _trees(3, 3)
  merged = weight_averaging.slerp_task_vectors(init, [first, second])
  for path in (('w',), ('b', 'x')):
    get = lambda tree: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
    expected = get(init) + _numpy_slerp(get(first) - get(init), get(second) - get(init), 0.5)
    np.testing.assert_allclose(get(merged), expected, rtol=1e-4, atol=1e-5)
    full_weights = _numpy_slerp(get(first), get(second), 0.5)
    assert not np.allclose(get(merged), full_weights, atol=1e-3)


def test_merge_of_models_with_parallel_task_vectors_is_their_mean():
  init = _trees(4, 1)[0]
  direction = _trees(5, 1)[0]
  models = [jax.tree_util.tree_map(lambda i, d, s=scale: i + s * d, init, direction)
            for scale in (1.0, 2.0, 4.0)]
  merged = weight_averaging.slerp_task_vectors(init, models)
  expected = jax.tree_util.tree_map(lambda i, d: i + (7.0 / 3.0) * d, init, direction)
  jax.tree_util.tree_map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-5), merged,
                         expected)


def test_liti_moves_the_init_by_eta_towards_the_merge():
  init, merged = _trees(6, 2)
  result = weight_averaging.liti(init, merged, 0.3)
  np.testing.assert_allclose(result['w'], 0.7 * init['w'] + 0.3 * merged['w'], rtol=1e-6)
  np.testing.assert_allclose(result['w'] - init['w'], 0.3 * (merged['w'] - init['w']),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='LITI rate must be in'):
    weight_averaging.liti(init, merged, 1.5)


def test_average_is_the_numpy_mean_of_the_trees():
  trees = _trees(7, 4)
  averaged = weight_averaging.average(trees)
  np.testing.assert_allclose(averaged['w'], np.mean([t['w'] for t in trees], axis=0), rtol=1e-6)
  np.testing.assert_allclose(averaged['b']['x'], np.mean([t['b']['x'] for t in trees], axis=0),
                             rtol=1e-6)


def test_merging_models_of_different_architectures_is_refused():
  first, second = _trees(8, 2)
  second['w'] = second['w'][:2]
  with pytest.raises(AssertionError):
    weight_averaging.average([first, second])
  with pytest.raises(ValueError, match='another structure'):
    weight_averaging.average([first, {'w': first['w']}])
