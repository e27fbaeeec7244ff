"""Evaluation of a served policy on a task's held-out prompts."""
from collections.abc import Callable

import numpy as np


def evaluate(generate: Callable, task, *, temperature: float, batch_size: int,
             model: str = 'policy', max_new_tokens: int = 0) -> dict:
  """Mean reward of one completion per held-out prompt, and the parameter versions used.

  `generate` is InferenceClient.generate. Returns reward, exact-match rate, mean completion
  length and the set of parameter versions that answered (one, unless updates raced).
  """
  prompts = task.eval_prompts()
  rewards, lengths, versions = [], [], set()
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    result = generate([task.encode_prompt(p) for p in chunk], model=model,
                      max_new_tokens=max_new_tokens, temperature=temperature)
    versions.add(result.param_version)
    for prompt, completion in zip(chunk, result.completions):
      rewards.append(task.reward(prompt, completion.tokens))
      lengths.append(len(completion.tokens))
  rewards = np.asarray(rewards)
  return dict(reward=float(rewards.mean()), exact_match=float((rewards == 1.0).mean()),
              completion_length=float(np.mean(lengths)), num_prompts=len(prompts),
              param_versions=sorted(versions))
