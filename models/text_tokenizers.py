"""Tokenizers of pretrained checkpoints: SentencePiece `.model` and Hugging Face `tokenizer.json`.

Both implement `chorus.core.Tokenizer`, as the CharTokenizer does, so tasks encode with
whichever the policy was trained with. Special ids come from the checkpoint's files:
config.json's `bos_token_id` / `eos_token_id` / `pad_token_id` where it has them, else
tokenizer_config.json's token strings, else the SentencePiece model's own ids.
"""
from collections.abc import Iterable
import functools
import json
import os

import sentencepiece
import tokenizers

SENTENCEPIECE_FILE = 'tokenizer.model'
TOKENIZER_JSON_FILE = 'tokenizer.json'
# Files beside the tokenizer that transformers reads too; an export copies them.
_SIDE_FILES = ('tokenizer_config.json', 'special_tokens_map.json')
_SPECIAL = ('bos', 'eos', 'pad')


Special = int | str | None  # An id, a token string to look up, or None: the file's own.


class _TextTokenizer:
  """Special ids and the Tokenizer protocol's decoding rules; subclasses wrap a library.

  Attributes:
    bos_id, eos_id, pad_id: the special ids (pad falls back to EOS, as transformers
      does for models without a padding token).
    files: the files it was read from, which an export copies.
  """

  def _set_special_ids(self, special: dict[str, Special], own: dict[str, int | None],
                       files: tuple[str, ...]):
    """Sets the ids from `special` (ids or token strings), else from the file's `own` ids."""
    self.files = files
    ids = {}
    for name in _SPECIAL:
      value = special.get(name)
      if isinstance(value, str):
        token = self._piece_to_id(value)
        if token is None:
          raise ValueError(f'The {name} token {value!r} is not in {files[0]}.')
        value = token
      ids[name] = own.get(name) if value is None else int(value)
    if ids['bos'] is None or ids['eos'] is None:
      raise ValueError(f'{files[0]} defines no BOS or EOS token and the checkpoint\'s '
                       'config.json / tokenizer_config.json name none; tasks need both.')
    if ids['pad'] is None:
      ids['pad'] = ids['eos']
    for name, value in ids.items():
      if not 0 <= value < self.vocab_size:
        raise ValueError(f'{name}_id={value} is outside the vocabulary of {self.vocab_size} '
                         f'ids of {files[0]}.')
    self.bos_id, self.eos_id, self.pad_id = ids['bos'], ids['eos'], ids['pad']

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def _piece_to_id(self, piece: str) -> int | None:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, stopping at the first EOS and skipping PAD and BOS."""
    kept = []
    for token in ids:
      token = int(token)
      if token == self.eos_id:
        break
      if token not in (self.pad_id, self.bos_id):
        kept.append(token)
    return self._decode(kept)


class SentencePieceTokenizer(_TextTokenizer):
  """A SentencePiece model (Gemma's tokenizer.model).

  Args:
    model_file: the .model file.
    bos, eos, pad: each an id, a piece to look up, or None for the model's own.
    files: what an export copies (default: the model file).
  """

  def __init__(self, model_file: str, *, bos: Special = None, eos: Special = None,
               pad: Special = None, files: tuple[str, ...] = ()):
    self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    # SentencePiece says -1 for a special piece the model does not define.
    own = {name: getattr(self._processor, f'{name}_id')() for name in _SPECIAL}
    self._set_special_ids(dict(bos=bos, eos=eos, pad=pad),
                          {name: value for name, value in own.items() if value >= 0},
                          files or (model_file,))

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def _piece_to_id(self, piece: str) -> int | None:
    token = self._processor.piece_to_id(piece)
    return token if self._processor.id_to_piece(token) == piece else None

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS or EOS."""
    return self._processor.encode(text)

  def _decode(self, ids: list[int]) -> str:
    return self._processor.decode(ids)


class HuggingFaceTokenizer(_TextTokenizer):
  """A Hugging Face `tokenizers` tokenizer.json.

  Args:
    tokenizer_file: the tokenizer.json file.
    bos, eos: an id or a token string (tokenizer.json does not say which is which).
    pad: likewise, or None for EOS.
    files: what an export copies (default: the tokenizer file).
  """

  def __init__(self, tokenizer_file: str, *, bos: Special, eos: Special, pad: Special = None,
               files: tuple[str, ...] = ()):
    self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    self._set_special_ids(dict(bos=bos, eos=eos, pad=pad), {}, files or (tokenizer_file,))

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _piece_to_id(self, piece: str) -> int | None:
    return self._tokenizer.token_to_id(piece)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS or EOS (no post-processor template)."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=False)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as file:
    return json.load(file)


def _special_tokens(directory: str) -> dict[str, Special]:
  """config.json's special ids, else tokenizer_config.json's token strings."""
  config = _read_json(os.path.join(directory, 'config.json'))
  tokens = _read_json(os.path.join(directory, 'tokenizer_config.json'))
  special = {}
  for name in _SPECIAL:
    value = config.get(f'{name}_token_id')
    if isinstance(value, list):  # Instruction-tuned models list several EOS ids.
      value = value[0]
    if value is None:
      value = tokens.get(f'{name}_token')
      # An AddedToken is written as a dict holding its string.
      value = value.get('content') if isinstance(value, dict) else value
    special[name] = value
  return special


@functools.lru_cache(maxsize=8)
def load_tokenizer(directory: str) -> SentencePieceTokenizer | HuggingFaceTokenizer:
  """The tokenizer of a Hugging Face-layout checkpoint directory.

  tokenizer.model (SentencePiece, the original of Gemma's tokenizer) is read when
  present, else tokenizer.json. Cached per directory: every task of a process shares it.

  Raises:
    FileNotFoundError: the directory has neither file.
    ValueError: BOS or EOS cannot be found in the files.
  """
  directory = os.path.abspath(directory)
  side_files = tuple(os.path.join(directory, name) for name in _SIDE_FILES
                     if os.path.exists(os.path.join(directory, name)))
  special = _special_tokens(directory)
  for name, make in ((SENTENCEPIECE_FILE, SentencePieceTokenizer),
                     (TOKENIZER_JSON_FILE, HuggingFaceTokenizer)):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return make(path, **special, files=(path,) + side_files)
  raise FileNotFoundError(f'{directory} has neither {SENTENCEPIECE_FILE} (SentencePiece) nor '
                          f'{TOKENIZER_JSON_FILE} (Hugging Face tokenizers); copy the '
                          "checkpoint's tokenizer beside its weights.")
