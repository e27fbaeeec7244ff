"""Tests for diversity-rewarded CFG distillation: the losses against numpy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus.learners import cfg_distill

B, T, V = 4, 5, 7


def _log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _distillation_inputs(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = np.arange(T)[None, :] < lengths[:, None]

  def logits():
    return np.where(mask[..., None], rng.normal(scale=2.0, size=(B, T, V)), np.nan).astype(
        np.float32)

  return dict(student_logits=logits(), teacher_cond_logits=logits(),
              teacher_uncond_logits=logits(), mask=mask)


def _numpy_reverse_kl(student, teacher, mask):
  """Mean over real tokens of KL(softmax(student) || softmax(teacher)), and its gradient."""
  student = np.where(mask[..., None], student, 0.0).astype(np.float64)
  teacher = np.where(mask[..., None], teacher, 0.0).astype(np.float64)
  log_p, log_q = _log_softmax(student), _log_softmax(teacher)
  p = np.exp(log_p)
  token_kl = (p * (log_p - log_q)).sum(-1)
  num_tokens = mask.sum()
  grad = p * (log_p - log_q - token_kl[..., None]) / num_tokens
  return (token_kl * mask).sum() / num_tokens, np.where(mask[..., None], grad, 0.0)


@pytest.mark.parametrize('guidance_scale', [0.0, 1.0, 3.0])
def test_cfg_logits_is_the_guidance_formula(guidance_scale):
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 3, V)), rng.normal(size=(2, 3, V))
  np.testing.assert_allclose(cfg_distill.cfg_logits(cond, uncond, guidance_scale),
                             guidance_scale * cond + (1 - guidance_scale) * uncond,
                             rtol=1e-5, atol=1e-5)


def test_cfg_distribution_ignores_per_row_shifts_of_either_model():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(3, V)), rng.normal(size=(3, V))
  shifted = cfg_distill.cfg_logits(cond + rng.normal(size=(3, 1)),
                                   uncond + rng.normal(size=(3, 1)), 3.0)
  np.testing.assert_allclose(jax.nn.softmax(shifted),
                             jax.nn.softmax(cfg_distill.cfg_logits(cond, uncond, 3.0)),
                             atol=1e-6)


@pytest.mark.parametrize('guidance_scale', [0.5, 1.0, 3.0])
def test_distillation_loss_matches_numpy_in_value_and_gradient(guidance_scale):
  inputs = _distillation_inputs(seed=2)
  teacher = (guidance_scale * inputs['teacher_cond_logits'].astype(np.float64)
             + (1 - guidance_scale) * inputs['teacher_uncond_logits'])
  expected, expected_grad = _numpy_reverse_kl(inputs['student_logits'], teacher, inputs['mask'])
  (loss, metrics), grad = jax.value_and_grad(
      lambda s: cfg_distill.cfg_distillation_loss(
          **{**inputs, 'student_logits': s}, guidance_scale=guidance_scale),
      has_aux=True)(inputs['student_logits'])
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
  assert metrics['num_tokens'] == inputs['mask'].sum()
  assert all(np.isfinite(value) for value in metrics.values())


def test_distillation_loss_is_nonnegative_and_zero_at_the_cfg_teacher():
  inputs = _distillation_inputs(seed=3)
  loss, _ = cfg_distill.cfg_distillation_loss(**inputs, guidance_scale=3.0)
  assert loss > 0
  guided = np.asarray(cfg_distill.cfg_logits(inputs['teacher_cond_logits'],
                                             inputs['teacher_uncond_logits'], 3.0))
  row_shift = np.random.default_rng(4).normal(size=(B, T, 1)).astype(np.float32)
  loss, metrics = cfg_distill.cfg_distillation_loss(
      **{**inputs, 'student_logits': guided + row_shift}, guidance_scale=3.0)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  np.testing.assert_allclose(metrics['argmax_agreement'], 1.0)


def test_guidance_scale_one_distils_the_conditional_teacher():
  inputs = _distillation_inputs(seed=5)
  expected, _ = _numpy_reverse_kl(inputs['student_logits'], inputs['teacher_cond_logits'],
                                  inputs['mask'])
  loss, _ = cfg_distill.cfg_distillation_loss(**inputs, guidance_scale=1.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  loss, _ = cfg_distill.cfg_distillation_loss(
      **{**inputs, 'student_logits': inputs['teacher_cond_logits']}, guidance_scale=1.0)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_teacher_logits_get_no_gradient():
  inputs = _distillation_inputs(seed=6)
  grads = jax.grad(lambda cond, uncond: cfg_distill.cfg_distillation_loss(
      **{**inputs, 'teacher_cond_logits': cond, 'teacher_uncond_logits': uncond},
      guidance_scale=3.0)[0], argnums=(0, 1))(inputs['teacher_cond_logits'],
                                               inputs['teacher_uncond_logits'])
  for grad in grads:
    np.testing.assert_array_equal(grad, 0.0)


def test_distillation_rejects_mismatched_vocabularies():
  inputs = _distillation_inputs(seed=7)
  with pytest.raises(AssertionError, match=re.escape(f'{(B, T, V - 1)}]')):
    cfg_distill.cfg_distillation_loss(
        **{**inputs, 'teacher_uncond_logits': inputs['teacher_uncond_logits'][..., :-1]},
        guidance_scale=3.0)


@pytest.mark.parametrize('baseline', ['mean', 'none'])
def test_diversity_reinforce_matches_numpy_in_value_and_gradient(baseline):
  rng = np.random.default_rng(8)
  lengths = rng.integers(1, T + 1, size=B)
  mask = np.arange(T)[None, :] < lengths[:, None]
  logprobs = np.where(mask, -rng.exponential(size=(B, T)), np.nan).astype(np.float32)
  rewards = rng.uniform(0, 1, size=B).astype(np.float32)
  advantages = rewards - rewards.mean() if baseline == 'mean' else rewards
  sequence_logprobs = np.where(mask, logprobs, 0.0).sum(1)
  expected = -np.mean(sequence_logprobs * advantages)
  expected_grad = np.where(mask, -advantages[:, None] / B, 0.0)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: cfg_distill.diversity_reinforce_loss(lp, mask, rewards, baseline=baseline),
      has_aux=True)(logprobs)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['diversity_reward'], rewards.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['completion_length'], mask.sum(1).mean())
  # Rewards get no gradient.
  reward_grad = jax.grad(lambda r: cfg_distill.diversity_reinforce_loss(
      logprobs, mask, r, baseline=baseline)[0])(rewards)
  np.testing.assert_array_equal(reward_grad, 0.0)


def test_equal_diversity_rewards_give_no_gradient_with_the_mean_baseline():
  mask = np.ones((B, T), bool)
  logprobs = jnp.full((B, T), -1.0)
  grad = jax.grad(lambda lp: cfg_distill.diversity_reinforce_loss(
      lp, mask, jnp.full((B,), 0.4))[0])(logprobs)
  np.testing.assert_array_equal(grad, 0.0)


def test_diversity_reinforce_rejects_a_bad_reward_shape():
  with pytest.raises(AssertionError, match=re.escape(f'has shape {(B + 1,)}')):
    cfg_distill.diversity_reinforce_loss(np.zeros((B, T)), np.ones((B, T), bool), np.zeros(B + 1))
