"""Writes examples/copy_prompts.jsonl: copy a digit string, with a sloppy annotator.

    python examples/make_copy_prompts.py > examples/copy_prompts.jsonl

Every row has an `id`, a `prompt` and the `answer` the reward reads; half the rows also
have a `completion`, a demonstration for the warm start, and a third of those swap two
neighbouring digits (the annotator was sloppy). Imitation learns the mistakes too; the
reward does not, so RL has something to improve.
"""
import json
import random


def main(num_rows: int = 2000, seed: int = 0):
  rng = random.Random(seed)
  for index in range(num_rows):
    digits = ''.join(rng.choice('0123456789') for _ in range(rng.randint(3, 6)))
    row = {'id': f'p{index}', 'prompt': f'copy {digits}>', 'answer': digits}
    if index % 2 == 0:
      completion = list(digits)
      if rng.random() < 1 / 3:
        i = rng.randrange(len(completion) - 1)
        completion[i], completion[i + 1] = completion[i + 1], completion[i]
      row['completion'] = ''.join(completion)
    print(json.dumps(row))


if __name__ == '__main__':
  main()
