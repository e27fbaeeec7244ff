"""SentencePiece and tokenizer.json tokenizers: the libraries' own ids, special ids from the
checkpoint's files, and the text task encoding with them."""
import json

import pytest
import sentencepiece
import tokenizers

import hf_checkpoints
from chorus import core
from chorus import models
from chorus.actors import reverse_digits

TEXTS = ('rev 3141>1413', 'rev 90210>01209', 'rev 7>7 rev 12>21', 'ever  >>r')


@pytest.fixture(scope='module', name='sentencepiece_file')
def fixture_sentencepiece_file(tmp_path_factory):
  return hf_checkpoints.train_sentencepiece(
      str(tmp_path_factory.mktemp('sentencepiece') / 'tokenizer.model'))


def _write_json(path, data):
  path.write_text(json.dumps(data))


def test_sentencepiece_ids_are_the_librarys_and_text_round_trips(sentencepiece_file):
  tokenizer = models.SentencePieceTokenizer(sentencepiece_file)
  reference = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_file)
  for text in TEXTS:
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # The model's own special ids, Gemma's: pad 0, eos 1, bos 2.
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.vocab_size == reference.get_piece_size()
  assert isinstance(tokenizer, core.Tokenizer)


def test_decoding_skips_bos_and_pad_and_stops_at_eos(sentencepiece_file):
  tokenizer = models.SentencePieceTokenizer(sentencepiece_file)
  ids = tokenizer.encode('rev 12>21')
  assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id]
                          + tokenizer.encode('junk') + [tokenizer.pad_id]) == 'rev 12>21'


def test_config_json_special_ids_win_over_the_models_own(sentencepiece_file, tmp_path):
  (tmp_path / 'tokenizer.model').write_bytes(open(sentencepiece_file, 'rb').read())
  _write_json(tmp_path / 'config.json', {'bos_token_id': 2, 'eos_token_id': [3, 1],
                                         'pad_token_id': None})
  tokenizer = models.load_tokenizer(str(tmp_path))
  assert isinstance(tokenizer, models.SentencePieceTokenizer)
  # A list of EOS ids counts by its first; no pad id in config.json: the model's own.
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 3, 0)
  assert tokenizer.files == (str(tmp_path / 'tokenizer.model'),)


@pytest.fixture(name='tokenizer_json_dir')
def fixture_tokenizer_json_dir(tmp_path):
  """A byte-level BPE tokenizer.json trained with `tokenizers`, and its tokenizer_config.json."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<pad>', '<eos>', '<bos>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(hf_checkpoints.digit_reversal_lines(500), trainer)
  tokenizer.save(str(tmp_path / 'tokenizer.json'))
  _write_json(tmp_path / 'tokenizer_config.json', {
      'bos_token': '<bos>', 'pad_token': '<pad>',
      'eos_token': {'content': '<eos>', 'special': True}})  # An AddedToken, as saved.
  return tmp_path


def test_tokenizer_json_ids_are_the_librarys_and_specials_come_from_its_config(
    tokenizer_json_dir):
  tokenizer = models.load_tokenizer(str(tokenizer_json_dir))
  reference = tokenizers.Tokenizer.from_file(str(tokenizer_json_dir / 'tokenizer.json'))
  assert isinstance(tokenizer, models.HuggingFaceTokenizer)
  for text in TEXTS:
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_id, 5]) == text
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == tuple(
      reference.token_to_id(token) for token in ('<pad>', '<eos>', '<bos>'))
  assert tokenizer.files == (str(tokenizer_json_dir / 'tokenizer.json'),
                             str(tokenizer_json_dir / 'tokenizer_config.json'))


def test_missing_tokenizer_and_unknown_special_token_are_named(tokenizer_json_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='neither tokenizer.model'):
    models.load_tokenizer(str(tmp_path / 'empty'))
  _write_json(tokenizer_json_dir / 'tokenizer_config.json', {'bos_token': '<s>',
                                                             'eos_token': '<eos>'})
  with pytest.raises(ValueError, match="The bos token '<s>' is not in"):
    models.load_tokenizer(str(tokenizer_json_dir))


def test_the_text_task_encodes_and_rewards_with_a_given_tokenizer(sentencepiece_file):
  tokenizer = models.SentencePieceTokenizer(sentencepiece_file)
  task = reverse_digits.ReverseDigitsTask(tokenizer=tokenizer)
  prompt = task.prompt_from_id('3141')
  assert task.encode_prompt(prompt) == [tokenizer.bos_id] + tokenizer.encode('rev 3141>')
  completion = task.encode_completion(prompt.answer)
  assert completion == tokenizer.encode('1413') + [tokenizer.eos_id]
  assert task.reward(prompt, completion) == 1.0
  assert task.reward(prompt, task.encode_completion('1431')) == 0.5
  # Gemma-style tokenizers split digits: one token per digit, then EOS.
  assert task.max_answer_tokens == task.config.max_digits + 1
