"""Evaluation of a served policy on a task's held-out prompts."""
from collections.abc import Callable
import time

import numpy as np


def _sample_and_score(generate: Callable, task, prompts, batch_size: int, num_samples: int,
                      **generate_kwargs) -> dict:
  """Rewards [len(prompts), num_samples], their components, completions, versions, time."""
  rewards, components, completions, versions, seconds = [], {}, [], set(), 0.0
  prompts_per_call = max(1, batch_size // num_samples)
  for start in range(0, len(prompts), prompts_per_call):
    chunk = prompts[start:start + prompts_per_call]
    began = time.monotonic()
    result = generate([task.encode_prompt(p) for p in chunk], num_samples=num_samples,
                      **generate_kwargs)
    seconds += time.monotonic() - began
    versions.add(result.param_version)
    for index, prompt in enumerate(chunk):
      samples = result.completions[index * num_samples:(index + 1) * num_samples]
      terms = [task.reward_components(prompt, c.tokens) for c in samples]
      rewards.append([sum(t.values()) for t in terms])  # What task.reward returns.
      for term in terms:
        for name, value in term.items():
          if not np.isfinite(value):
            continue
          components.setdefault(name, []).append(value)
      completions.append(samples)
  return dict(rewards=np.asarray(rewards), completions=completions, versions=versions,
              seconds=seconds, components={name: float(np.mean(values))
                                           for name, values in components.items()})


def evaluate(generate: Callable, task, *, temperature: float, batch_size: int,
             model: str = 'policy', max_new_tokens: int = 0,
             opponent_model: str | None = None, prompts=None, guidance_scale: float = 0.0,
             with_diversity: bool = False) -> dict:
  """Mean reward of the served policy on held-out prompts, and the parameter versions used.

  `generate` is InferenceClient.generate. Returns reward, exact-match rate, mean completion
  length, generated tokens per second seen by the caller, and the set of parameter
  versions that answered (one, unless updates raced).
  Options:
    opponent_model: also sample that model (the frozen reference, say) on the same
      prompts; `win_rate` is the share of prompts where the policy's reward beats the
      opponent's, ties counting half.
    prompts: replaces the task's held-out prompts (say, those of a recorded dataset).
    guidance_scale: > 0 samples with classifier-free guidance against the task's
      unconditional prompt (music tasks).
    with_diversity: two samples per prompt; `diversity` is the mean of the task's
      `diversity_reward` between them (music tasks).
  """
  prompts = task.eval_prompts() if prompts is None else prompts
  num_samples = 2 if with_diversity else 1
  settings = dict(model=model, max_new_tokens=max_new_tokens, temperature=temperature)
  if guidance_scale > 0:
    settings.update(guidance_scale=guidance_scale,
                    unconditional_prompts=[task.unconditional_prompt_tokens()])
  sampled = _sample_and_score(generate, task, prompts, batch_size, num_samples, **settings)
  rewards = sampled['rewards']
  lengths = [len(c.tokens) for samples in sampled['completions'] for c in samples]
  finite = np.isfinite(rewards)
  # Failed rewards (GuardedTask: NaN) are left out of the mean and counted.
  mean_reward = float(rewards[finite].mean()) if finite.any() else float('nan')
  result = dict(reward=mean_reward, skipped_rewards=int((~finite).sum()),
                exact_match=float((rewards == 1.0).mean()),
                completion_length=float(np.mean(lengths)), num_prompts=len(prompts),
                tokens_per_second=float(np.sum(lengths) / max(sampled['seconds'], 1e-9)),
                reward_components=sampled['components'],
                param_versions=sorted(sampled['versions']))
  if with_diversity:
    result['diversity'] = float(np.mean([task.diversity_reward(a.tokens, b.tokens)
                                         for a, b in sampled['completions']]))
  if opponent_model:
    opponent = _sample_and_score(generate, task, prompts, batch_size, 1,
                                 **{**settings, 'model': opponent_model})['rewards'][:, 0]
    policy = rewards[:, 0]
    result['win_rate'] = float(np.mean((policy > opponent) + 0.5 * (policy == opponent)))
  return result
