"""The generalized JSD of GKD (learners/gkd.py) against numpy, in value and gradient."""
import jax
from jax.experimental import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners import gkd


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


def _numpy_jsd(student_logits, teacher_logits, mask, beta) -> float:
  """Mean over real tokens of beta KL(P||M) + (1-beta) KL(Q||M), in probability space."""
  p = _softmax(np.asarray(teacher_logits, np.float64))
  q = _softmax(np.asarray(student_logits, np.float64))
  kl = lambda a, b: np.sum(a * np.log(a / b), axis=-1)
  if beta == 0:
    values = kl(p, q)
  elif beta == 1:
    values = kl(q, p)
  else:
    m = beta * p + (1 - beta) * q
    values = beta * kl(p, m) + (1 - beta) * kl(q, m)
  return float(values[mask].mean())


def _inputs(seed=0, batch=3, length=4, vocab=6):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(batch, length, vocab)) * 2
  teacher = rng.normal(size=(batch, length, vocab)) * 2
  mask = np.arange(length)[None, :] < np.array([4, 2, 3])[:, None]
  return student, teacher, mask


@pytest.mark.parametrize('beta', [0.0, 0.1, 0.5, 0.9, 1.0])
def test_loss_matches_numpy(beta):
  student, teacher, mask = _inputs()
  loss, _ = gkd.gkd_loss(student.astype(np.float32), teacher.astype(np.float32), mask,
                         beta=beta)
  assert float(loss) == pytest.approx(_numpy_jsd(student, teacher, mask, beta), rel=1e-4)


def test_beta_zero_is_forward_and_beta_one_reverse_kl():
  student, teacher, mask = _inputs(1)
  p, q = _softmax(teacher)[mask], _softmax(student)[mask]
  forward = np.mean(np.sum(p * np.log(p / q), -1))   # KL(teacher || student)
  reverse = np.mean(np.sum(q * np.log(q / p), -1))   # KL(student || teacher)
  assert abs(forward - reverse) > 0.05  # The two really differ on these inputs.
  at_zero, metrics = gkd.gkd_loss(student, teacher, mask, beta=0.0)
  at_one, _ = gkd.gkd_loss(student, teacher, mask, beta=1.0)
  assert float(at_zero) == pytest.approx(forward, rel=1e-4)
  assert float(at_one) == pytest.approx(reverse, rel=1e-4)
  assert float(metrics['forward_kl']) == pytest.approx(forward, rel=1e-4)
  assert float(metrics['reverse_kl']) == pytest.approx(reverse, rel=1e-4)


def test_the_end_points_are_the_limits_of_the_mixture_divergence():
  student, teacher, mask = _inputs(2)
  with enable_x64():
    epsilon = 1e-5
    near_zero, _ = gkd.gkd_loss(student, teacher, mask, beta=epsilon)
    near_one, _ = gkd.gkd_loss(student, teacher, mask, beta=1 - epsilon)
    at_zero, _ = gkd.gkd_loss(student, teacher, mask, beta=0.0)
    at_one, _ = gkd.gkd_loss(student, teacher, mask, beta=1.0)
    assert float(near_zero) / epsilon == pytest.approx(float(at_zero), rel=1e-3)
    assert float(near_one) / epsilon == pytest.approx(float(at_one), rel=1e-3)


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
  student, teacher, mask = _inputs(3)
  grad = jax.grad(lambda s: gkd.gkd_loss(s, teacher, mask, beta=0.0)[0])(
      jnp.asarray(student, jnp.float32))
  expected = (_softmax(student) - _softmax(teacher)) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize('beta', [0.0, 0.3, 1.0])
def test_gradient_matches_finite_differences(beta):
  student, teacher, mask = _inputs(4, batch=2, length=3, vocab=5)
  mask = np.array([[True, True, False], [True, True, True]])
  with enable_x64():
    loss = lambda s: gkd.gkd_loss(s, jnp.asarray(teacher), mask, beta=beta)[0]
    grad = np.asarray(jax.grad(loss)(jnp.asarray(student)))
    numeric = np.zeros_like(student)
    step = 1e-6
    for index in np.ndindex(student.shape):
      bumped = student.copy()
      bumped[index] += step
      up = _numpy_jsd(bumped, teacher, mask, beta)
      bumped[index] -= 2 * step
      numeric[index] = (up - _numpy_jsd(bumped, teacher, mask, beta)) / (2 * step)
  np.testing.assert_allclose(grad, numeric, atol=1e-7)
  assert np.all(grad[0, 2] == 0)  # Padding gets no gradient.


def test_teacher_gets_no_gradient_and_padding_may_be_nan():
  student, teacher, mask = _inputs(5)
  student[~mask] = np.nan
  teacher[~mask] = np.nan
  loss_fn = lambda s, t: gkd.gkd_loss(s, t, mask, beta=0.5)[0]
  student_grad, teacher_grad = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(student),
                                                                  jnp.asarray(teacher))
  assert np.isfinite(float(loss_fn(student, teacher)))
  assert np.all(np.isfinite(student_grad)) and np.all(teacher_grad == 0)


def test_loss_is_zero_when_the_student_is_the_teacher():
  _, teacher, mask = _inputs(6)
  for beta in (0.0, 0.5, 1.0):
    loss, metrics = gkd.gkd_loss(teacher, teacher, mask, beta=beta)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics['argmax_agreement']) == 1.0


def test_beta_outside_the_unit_interval_is_refused():
  student, teacher, mask = _inputs()
  with pytest.raises(ValueError, match='beta must be in'):
    gkd.gkd_loss(student, teacher, mask, beta=1.5)
