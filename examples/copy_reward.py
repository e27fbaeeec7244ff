"""The reward of examples/copy_prompts.jsonl: how much of the digit string was copied.

    chorus run --config text_vtrace --prompts examples/copy_prompts.jsonl \
        --reward examples/copy_reward.py:score

A reward function takes the prompt, the sampled completion (both text) and the prompt's
whole row from the file, and returns a float or a dict of named components (the reward is
their sum; episode logs and evaluations report each one).
"""


def score(prompt: str, completion: str, row: dict) -> dict[str, float]:
  """Positional accuracy of `completion` against the row's `answer`, in [0, 1].

  Missing or extra characters count as mistakes (the denominator is the longer string),
  so only the exact answer scores 1.
  """
  del prompt  # The row carries the answer.
  answer = row['answer']
  matches = sum(a == b for a, b in zip(completion, answer))
  return {'positional_accuracy': matches / max(len(completion), len(answer), 1)}
