"""A policy from a checkpoint directory or a run, its completions, and its export.

What `chorus sample` and `chorus export` do; the commands themselves (model_commands.py)
import this only when they run, since it loads JAX.
"""
import os

import jax
import numpy as np

from chorus import models
from chorus.inference_server import sampler as sampler_lib
from chorus.launch import evaluate


def from_checkpoint(directory: str, dtype: str = 'float32') -> models.Pretrained:
  """A Hugging Face-layout checkpoint directory's model, computing and stored in `dtype`."""
  return models.load_pretrained(directory, dtype=dtype, param_dtype=dtype)


def from_run(run_dir: str, step: int | None = None) -> tuple[models.Pretrained, int]:
  """A run's policy (learner checkpoint `step`, default the latest, else the warm start).

  Returns:
    The policy (its tokenizer: the pretrained model's, else the task's) and its step.
  """
  config = evaluate.load_config(run_dir)
  params, step = evaluate.load_policy(run_dir, config, step)
  tokenizer = config.model.tokenizer() or config.make_task().tokenizer
  return models.Pretrained(config.model.base_decoder_config(), params, tokenizer), step


def complete(policy: models.Pretrained, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float, seed: int) -> list[int]:
  """The completion of one prompt: its token ids, EOS last if it was sampled.

  Args:
    policy: the model.
    prompt_ids: the prompt as fed to the model (BOS first).
    max_new_tokens: at most this many tokens are sampled.
    temperature: 0 is greedy (the argmax at every step).
    seed: the sampling seed.
  """
  sample = sampler_lib.make_sampler(policy.config, len(prompt_ids), max_new_tokens)
  tokens, mask = models.left_pad_prompts([prompt_ids], len(prompt_ids))
  output = sample(policy.params, tokens, mask, np.asarray([temperature], np.float32),
                  np.asarray([max_new_tokens], np.int32), jax.random.PRNGKey(seed))
  return np.asarray(output.tokens[0, :int(output.lengths[0])]).tolist()


def complete_text(policy: models.Pretrained, prompt: str, **options) -> tuple[list[int], str]:
  """(completion ids, completion text) of a text prompt, BOS prepended; options of `complete`."""
  prompt_ids = [policy.tokenizer.bos_id] + policy.tokenizer.encode(prompt)
  ids = complete(policy, prompt_ids, **options)
  return ids, policy.tokenizer.decode(ids)


def export_run(run_dir: str, output: str, step: int | None = None) -> tuple[int, list[str]]:
  """Writes a run's policy as a Hugging Face-layout checkpoint (see models.save_pretrained).

  The tokenizer files are the pretrained model's; a run from scratch on a text task gets
  its character tokenizer as a tokenizer.json; a music run's tokenizer has no file format.

  Returns:
    (the step exported, the paths written).
  """
  config = evaluate.load_config(run_dir)
  policy, step = from_run(run_dir, step)
  written = models.save_pretrained(
      output, policy.config, policy.params, bos_token_id=policy.tokenizer.bos_id,
      pad_token_id=policy.tokenizer.pad_id,
      tokenizer_files=policy.tokenizer.files if config.model.pretrained else ())
  if isinstance(policy.tokenizer, models.CharTokenizer):
    written.append(policy.tokenizer.save_tokenizer_json(
        os.path.join(output, models.text_tokenizers.TOKENIZER_JSON_FILE)))
  return step, written
