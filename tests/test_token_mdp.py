"""Tests for the token-level MDP of a batch of completions."""
import re

import numpy as np
import pytest

from chorus.learners import token_mdp

# Rows: terminated and padded, truncated at full length, terminated after one token,
# truncated and padded, and a row with no real token.
MASK = np.array([
    [1, 1, 1, 0],
    [1, 1, 1, 1],
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 0, 0],
], dtype=bool)
TERMINATED = np.array([True, False, True, False, True])


def test_last_token_index_is_minus_one_for_empty_rows():
  np.testing.assert_array_equal(token_mdp.last_token_index(MASK), [2, 3, 0, 1, -1])


def test_token_discounts_zero_at_eos_gamma_at_truncation_zero_on_padding():
  discounts = token_mdp.token_discounts(MASK, TERMINATED, gamma=0.9)
  np.testing.assert_allclose(discounts, [
      [0.9, 0.9, 0.0, 0.0],
      [0.9, 0.9, 0.9, 0.9],
      [0.0, 0.0, 0.0, 0.0],
      [0.9, 0.9, 0.0, 0.0],
      [0.0, 0.0, 0.0, 0.0],
  ], rtol=1e-6)


def test_token_discounts_default_gamma_is_one():
  discounts = token_mdp.token_discounts(MASK[:2], TERMINATED[:2])
  np.testing.assert_array_equal(discounts, [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_token_rewards_fold_kl_into_every_real_token_and_task_reward_into_last():
  task_rewards = np.array([1.0, -2.0, 3.0, 0.5, 7.0])
  behaviour = np.array([
      [-1.0, -2.0, -0.5, np.nan],
      [-1.0, -1.0, -1.0, -1.0],
      [-3.0, -np.inf, 0.0, 0.0],
      [-0.5, -0.5, 9.0, 9.0],
      [-1.0, -1.0, -1.0, -1.0],
  ])
  reference = np.array([
      [-2.0, -1.0, -0.5, 0.0],
      [-1.0, -3.0, -1.0, -2.0],
      [-1.0, 0.0, 0.0, 0.0],
      [-0.5, -1.5, 0.0, 0.0],
      [-5.0, -5.0, -5.0, -5.0],
  ])
  rewards = token_mdp.token_rewards(task_rewards, MASK, behaviour, reference, kl_coef=0.1)
  np.testing.assert_allclose(rewards, [
      [-0.1, 0.1, 0.0 + 1.0, 0.0],
      [0.0, -0.2, 0.0, -0.1 - 2.0],
      [0.2 + 3.0, 0.0, 0.0, 0.0],
      [0.0, -0.1 + 0.5, 0.0, 0.0],
      [0.0, 0.0, 0.0, 0.0],
  ], rtol=1e-6, atol=1e-7)


def test_token_rewards_without_kl_are_the_task_reward_on_the_last_token():
  rewards = token_mdp.token_rewards(
      np.array([2.0, 5.0]), MASK[:2], np.zeros((2, 4)), np.ones((2, 4)), kl_coef=0.0)
  np.testing.assert_array_equal(rewards, [[0, 0, 2, 0], [0, 0, 0, 5]])


@pytest.mark.parametrize('task_rewards, behaviour, reference, match', [
    (np.zeros(5), np.zeros((5, 4)), np.zeros((5, 3)), 'different shapes'),
    (np.zeros(5), np.zeros((4, 4)), np.zeros((5, 4)), 'different shapes'),
    (np.zeros(4), np.zeros((5, 4)), np.zeros((5, 4)), re.escape('has shape (4,)')),
    (np.zeros((5, 1)), np.zeros((5, 4)), np.zeros((5, 4)), re.escape('rank 2 (shape (5, 1))')),
])
def test_token_rewards_rejects_bad_shapes(task_rewards, behaviour, reference, match):
  with pytest.raises(AssertionError, match=match):
    token_mdp.token_rewards(task_rewards, MASK, behaviour, reference, kl_coef=0.1)


def test_token_rewards_rejects_negative_kl_coef():
  with pytest.raises(ValueError, match='kl_coef'):
    token_mdp.token_rewards(np.zeros(5), MASK, np.zeros((5, 4)), np.zeros((5, 4)), -1.0)


def test_token_discounts_rejects_bad_shapes_and_gamma():
  with pytest.raises(AssertionError, match=re.escape('has shape (4,)')):
    token_mdp.token_discounts(MASK, TERMINATED[:4])
  with pytest.raises(AssertionError, match=re.escape('rank 1 (shape (4,)) but expected 2')):
    token_mdp.token_discounts(MASK[0], TERMINATED)
  with pytest.raises(ValueError, match='gamma'):
    token_mdp.token_discounts(MASK, TERMINATED, gamma=1.5)
