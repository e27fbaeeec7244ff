"""Small checkpoints in the real Hugging Face layout, written by transformers, for tests.

Nothing can be downloaded here, so the tests make their own: a SentencePiece tokenizer
trained on digit-reversal text (Gemma's special ids: pad 0, eos 1, bos 2, unk 3; digits
split, no dummy prefix, whitespace kept, as in Gemma's tokenizer) and tiny random Gemma /
Gemma 2 models saved with `save_pretrained`.
"""
import io
import os
import shutil

import numpy as np
import sentencepiece
import torch
import transformers

from chorus.actors import reverse_digits


def digit_reversal_lines(count: int, seed: int = 0) -> list[str]:
  """Prompts of the built-in task followed by their answers, e.g. 'rev 3141>1413'."""
  task, rng = reverse_digits.ReverseDigitsTask(), np.random.default_rng(seed)
  return [prompt.text + prompt.answer
          for prompt in (task.train_prompt(rng) for _ in range(count))]


def train_sentencepiece(path: str, lines: list[str] | None = None) -> str:
  """Trains a small BPE SentencePiece model with Gemma's conventions; returns `path`."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines or digit_reversal_lines(2000)), model_writer=model,
      vocab_size=40, hard_vocab_limit=False, model_type='bpe', split_digits=True,
      add_dummy_prefix=False, remove_extra_whitespaces=False, pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, minloglevel=2)
  with open(path, 'wb') as file:
    file.write(model.getvalue())
  return path


def write_gemma(directory: str, kind: str, *, vocab_size: int, tokenizer_model: str = '',
                scramble: bool = True, seed: int = 0, **config):
  """Saves a tiny random transformers Gemma ('gemma') or Gemma 2 ('gemma2') in float32.

  Args:
    directory: where to save (config.json, model.safetensors, generation_config.json).
    kind: 'gemma' or 'gemma2'.
    vocab_size: the model's vocabulary.
    tokenizer_model: a SentencePiece model to copy beside it as tokenizer.model.
    scramble: redraw every weight (norm scales included) with a large spread, so that
      each part of the architecture moves the logits; otherwise transformers' init.
    seed: torch seed.
    **config: config fields over the tiny defaults.

  Returns:
    The transformers model, in eval mode.
  """
  torch.manual_seed(seed)
  fields = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=64)
  fields.update(config)
  if kind == 'gemma':
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**fields))
  else:
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**fields))
  if scramble:
    with torch.no_grad():
      for name, parameter in model.named_parameters():
        parameter.normal_(0.0, 0.5 if 'norm' in name else 0.3)
  model.eval()
  model.save_pretrained(directory)
  if tokenizer_model:
    shutil.copy(tokenizer_model, os.path.join(directory, 'tokenizer.model'))
  return model


def logits(model, token_ids) -> np.ndarray:
  """transformers' logits [B, L, V] of unpadded rows `token_ids` [B, L]."""
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(token_ids), dtype=torch.long)).logits.numpy()
