"""The caption vocabulary: five attributes of two values each, and parsing captions."""
import itertools

# (attribute, its values); a caption names one value of each, in this order.
ATTRIBUTES = (
    ('tempo', ('slow', 'fast')),
    ('register', ('low', 'high')),
    ('mode', ('major', 'minor')),
    ('timbre', ('soft', 'bright')),
    ('loudness', ('quiet', 'loud')),
)
CAPTION_WORDS = tuple(word for _, values in ATTRIBUTES for word in values)
NULL_CAPTION_WORD = '<null>'
_ATTRIBUTE_OF_WORD = {word: name for name, values in ATTRIBUTES for word in values}


def parse_caption(text: str) -> dict[str, str]:
  """{attribute: value} of a caption such as 'fast high minor bright loud'.

  Words may come in any order and attributes may be missing; '' and '<null>' are the
  unconditional caption ({}).
  """
  attributes = {}
  for word in text.split():
    if word == NULL_CAPTION_WORD:
      continue
    if word not in _ATTRIBUTE_OF_WORD:
      raise ValueError(f'Unknown caption word {word!r}; use {list(CAPTION_WORDS)}.')
    name = _ATTRIBUTE_OF_WORD[word]
    if name in attributes:
      raise ValueError(f'Caption {text!r} names {name} twice ({attributes[name]!r} and '
                       f'{word!r}); give one value per attribute.')
    attributes[name] = word
  return attributes


def all_captions() -> list[str]:
  """Every full caption: one value of each attribute, in `ATTRIBUTES` order (32)."""
  return [' '.join(words) for words in itertools.product(*(v for _, v in ATTRIBUTES))]
