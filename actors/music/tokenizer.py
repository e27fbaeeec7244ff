"""The music model's joint vocabulary: special tokens, caption words, then audio codes."""
import numpy as np

from chorus import models
from chorus.actors.music import captions

# Ids of the vocabulary's blocks (the layout is in the package docstring).
CAPTION_OFFSET = 3  # After PAD, BOS and EOS.
NULL_CAPTION_ID = CAPTION_OFFSET + len(captions.CAPTION_WORDS)
AUDIO_OFFSET = NULL_CAPTION_ID + 1


class MusicTokenizer:
  """The joint caption + audio-code vocabulary (layout in the package docstring).

  Args:
    num_codes: the codec's number of codes.
  """

  def __init__(self, num_codes: int):
    if num_codes < 1:
      raise ValueError(f'num_codes must be >= 1; got {num_codes}.')
    self.num_codes = num_codes
    self.pad_id, self.bos_id, self.eos_id = models.PAD_ID, models.BOS_ID, models.EOS_ID
    self.null_caption_id = NULL_CAPTION_ID
    self.audio_offset = AUDIO_OFFSET
    self._word_ids = {word: CAPTION_OFFSET + i for i, word in enumerate(captions.CAPTION_WORDS)}
    self._word_ids[captions.NULL_CAPTION_WORD] = NULL_CAPTION_ID
    self._words = {token: word for word, token in self._word_ids.items()}

  @property
  def vocab_size(self) -> int:
    return AUDIO_OFFSET + self.num_codes

  def encode(self, text: str) -> list[int]:
    """Ids of a caption's words (space separated), without BOS or EOS."""
    words = text.split()
    unknown = [word for word in words if word not in self._word_ids]
    if unknown:
      raise ValueError(f'Caption words {unknown} are not in the vocabulary '
                       f'{list(self._word_ids)}.')
    return [self._word_ids[word] for word in words]

  def encode_codes(self, codes) -> list[int]:
    """Token ids of codec codes [T] (no EOS)."""
    codes = np.asarray(codes, np.int64).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
      raise ValueError(f'codes must be in [0, {self.num_codes}); got range '
                       f'[{codes.min()}, {codes.max()}].')
    return (codes + AUDIO_OFFSET).tolist()

  def decode_codes(self, ids) -> tuple[np.ndarray, np.ndarray]:
    """Codec codes of a completion, up to its first EOS.

    Args:
      ids: [T] token ids.

    Returns:
      ([N] int64 codes, [N] bool valid): one entry per token before EOS; a token that
      is not an audio token (PAD, BOS, a caption word, out of range) has code 0 and
      valid False.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[:eos[0]]
    codes = ids - AUDIO_OFFSET
    valid = (codes >= 0) & (codes < self.num_codes)
    return np.where(valid, codes, 0), valid

  def decode(self, ids) -> str:
    """Readable text, e.g. 'fast high minor bright loud | <audio 24 frames>'.

    Stops at the first EOS and skips PAD and BOS; caption words before the audio are
    spelled out, audio tokens counted, anything else counted as invalid.
    """
    words, frames, invalid = [], 0, 0
    for token in np.asarray(ids, np.int64).reshape(-1).tolist():
      if token == self.eos_id:
        break
      if token in (self.pad_id, self.bos_id):
        continue
      if AUDIO_OFFSET <= token < self.vocab_size:
        frames += 1
      elif token in self._words and not frames:
        words.append(self._words[token])
      else:
        invalid += 1
    parts = [' '.join(words)] if words else []
    if frames or invalid:
      extra = f', {invalid} invalid' if invalid else ''
      parts.append(f'<audio {frames} frames{extra}>')
    return ' | '.join(parts)

  def decode_batch(self, batch) -> list[str]:
    return [self.decode(ids) for ids in batch]
