"""Character tokenizer for the built-in tasks."""
from collections.abc import Iterable, Sequence

import tokenizers

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
DEFAULT_ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz+-*=<>(),.:;? '


class CharTokenizer:
  """Maps characters to ids 3.. ; 0 is padding, 1 begins a sequence, 2 ends one."""

  def __init__(self, alphabet: str = DEFAULT_ALPHABET):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f'Tokenizer alphabet has repeated characters: {alphabet!r}.')
    self.alphabet = alphabet
    self._ids = {char: index + 3 for index, char in enumerate(alphabet)}
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

  @property
  def vocab_size(self) -> int:
    return len(self.alphabet) + 3

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS or EOS."""
    unknown = sorted(set(text) - set(self._ids))
    if unknown:
      raise ValueError(
          f'Characters {unknown} are not in the tokenizer alphabet {self.alphabet!r}.')
    return [self._ids[char] for char in text]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, stopping at the first EOS and skipping PAD and BOS."""
    chars = []
    for token in ids:
      token = int(token)
      if token == EOS_ID:
        break
      if token >= 3:
        chars.append(self.alphabet[token - 3])
    return ''.join(chars)

  def decode_batch(self, batch: Sequence[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]

  def save_tokenizer_json(self, path: str) -> str:
    """Writes this tokenizer as a Hugging Face tokenizer.json (same ids); returns `path`.

    One token per character, concatenated back on decoding; '<pad>', '<bos>' and '<eos>'
    are the special ids 0, 1 and 2 (an exported checkpoint's config.json names them).
    """
    specials = ['<pad>', '<bos>', '<eos>']
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update(self._ids)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex('.'),
                                                              behavior='isolated')
    tokenizer.decoder = tokenizers.decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(path)
    return path
