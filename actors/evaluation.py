"""Evaluation of a served policy on a task's held-out prompts."""
from collections.abc import Callable

import numpy as np


def _rewards(generate: Callable, task, prompts, batch_size: int,
             **generate_kwargs) -> tuple[np.ndarray, list, set]:
  rewards, lengths, versions = [], [], set()
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    result = generate([task.encode_prompt(p) for p in chunk], **generate_kwargs)
    versions.add(result.param_version)
    for prompt, completion in zip(chunk, result.completions):
      rewards.append(task.reward(prompt, completion.tokens))
      lengths.append(len(completion.tokens))
  return np.asarray(rewards), lengths, versions


def evaluate(generate: Callable, task, *, temperature: float, batch_size: int,
             model: str = 'policy', max_new_tokens: int = 0,
             opponent_model: str | None = None) -> dict:
  """Mean reward of one completion per held-out prompt, and the parameter versions used.

  `generate` is InferenceClient.generate. Returns reward, exact-match rate, mean completion
  length and the set of parameter versions that answered (one, unless updates raced).
  With `opponent_model` (the frozen reference, say) it also samples that model on the
  same prompts and returns `win_rate`: the share of prompts where the policy's reward
  beats the opponent's, ties counting half.
  """
  prompts = task.eval_prompts()
  settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature)
  rewards, lengths, versions = _rewards(generate, task, prompts, model=model, **settings)
  result = dict(reward=float(rewards.mean()), exact_match=float((rewards == 1.0).mean()),
                completion_length=float(np.mean(lengths)), num_prompts=len(prompts),
                param_versions=sorted(versions))
  if opponent_model:
    opponent_rewards, _, _ = _rewards(generate, task, prompts, model=opponent_model, **settings)
    result['win_rate'] = float(np.mean((rewards > opponent_rewards)
                                       + 0.5 * (rewards == opponent_rewards)))
  return result
