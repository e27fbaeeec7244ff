"""Tests for the built-in codec and the music task: audio, features, rewards, corpus."""

import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus.actors import music
from chorus.actors import tasks
from chorus.models import codec as codec_lib

OPPOSITE = {first: second for _, (first, second) in music.ATTRIBUTES}
OPPOSITE.update({second: first for first, second in OPPOSITE.items()})
BASE_CAPTION = 'fast high minor bright loud'


@pytest.fixture(scope='module')
def task():
  return music.MusicTask()


def _caption_with(word: str, base: str = BASE_CAPTION) -> str:
  """`base` with the attribute of `word` set to `word`."""
  return ' '.join(word if OPPOSITE[word] == other or word == other else other
                  for other in base.split())


def _demo_tokens(task, caption, seed=0):
  rng = np.random.default_rng(seed)
  return task.demonstration(task.prompt_from_id(caption), rng)


def _demo_features(task, caption, seeds=range(4)):
  return [task.features(_demo_tokens(task, caption, seed)) for seed in seeds]


def test_codec_round_trips_every_code_deterministically():
  codec = codec_lib.SynthCodec()
  assert isinstance(codec, codec_lib.Codec)
  assert (codec.sample_rate, codec.frame_samples, codec.num_codes) == (16_000, 1600, 49)
  codes = np.random.default_rng(0).permutation(np.tile(np.arange(codec.num_codes), 2))
  waveform = codec.decode(codes)
  assert waveform.shape == (codes.size * codec.frame_samples,)
  assert waveform.dtype == np.float32 and np.abs(waveform).max() <= 1.0
  np.testing.assert_array_equal(codec.encode(waveform), codes)
  np.testing.assert_array_equal(codec_lib.SynthCodec().decode(codes), waveform)
  assert not np.any(codec.decode([codec.REST]))
  assert codec.note(codec.code(76, 'bright', 'loud')) == codec_lib.Note(76, 'bright', 'loud')


def test_codec_rejects_codes_outside_its_codebook():
  codec = codec_lib.SynthCodec()
  with pytest.raises(ValueError, match=r'codes must be integers in \[0, 49\)'):
    codec.decode([0, 49])
  with pytest.raises(ValueError, match='whole frames'):
    codec.encode(np.zeros(codec.frame_samples + 1))


def test_wav_round_trip_keeps_16_bit_audio_and_codes(tmp_path):
  codec = codec_lib.SynthCodec()
  codes = np.random.default_rng(1).integers(0, codec.num_codes, 12)
  waveform = codec.decode(codes)
  path = tmp_path / 'clip.wav'
  codec_lib.write_wav(path, waveform, codec.sample_rate)
  restored, sample_rate = codec_lib.read_wav(path)
  assert sample_rate == codec_lib.STANDARD_SAMPLE_RATE == 16_000
  assert restored.shape == waveform.shape
  assert np.abs(restored - waveform).max() <= 1.0 / 32767
  np.testing.assert_array_equal(codec.encode(restored), codes)


def test_features_are_measured_on_the_signal_itself():
  sample_rate = 16_000
  t = np.arange(sample_rate) / sample_rate
  features = music.audio_features(0.3 * np.sin(2 * np.pi * 440.0 * t), sample_rate)
  assert abs(features.median_midi - 69.0) < 0.2  # A4.
  assert features.pitch_class_histogram[9] == pytest.approx(1.0)
  assert abs(features.harmonic_brightness - 1.0) < 0.1
  assert features.loudness_db == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=0.1)
  silence = music.audio_features(np.zeros(sample_rate), sample_rate)
  assert not silence.has_music and silence.onset_rate_hz == 0.0
  assert music.audio_features(np.zeros(0), sample_rate).duration_s == 0.0


def test_features_follow_the_composed_attributes(task):
  def mean(caption, field):
    return np.mean([getattr(f, field) for f in _demo_features(task, caption)])

  assert mean(_caption_with('fast'), 'onset_rate_hz') > 2 * mean(_caption_with('slow'),
                                                                 'onset_rate_hz')
  assert mean(_caption_with('high'), 'median_midi') > mean(_caption_with('low'),
                                                           'median_midi') + 12
  assert mean(_caption_with('bright'), 'harmonic_brightness') > 2 * mean(
      _caption_with('soft'), 'harmonic_brightness')
  assert mean(_caption_with('bright'), 'spectral_centroid_hz') > mean(
      _caption_with('soft'), 'spectral_centroid_hz')
  assert mean(_caption_with('loud'), 'loudness_db') > mean(_caption_with('quiet'),
                                                           'loudness_db') + 6
  assert mean(_caption_with('major'), 'major_minor_balance') > 0.5
  assert mean(_caption_with('minor'), 'major_minor_balance') < -0.5


@pytest.mark.parametrize('word', music.CAPTION_WORDS)
def test_caption_adherence_prefers_audio_with_the_captioned_property(task, word):
  """The caption 'fast ...' scores higher on fast audio than on otherwise equal slow audio."""
  prompt = task.prompt_from_id(_caption_with(word))
  matching = _demo_tokens(task, _caption_with(word), seed=3)
  opposite = _demo_tokens(task, _caption_with(OPPOSITE[word]), seed=3)
  matching_score = task.reward_components(prompt, matching)['caption_adherence']
  opposite_score = task.reward_components(prompt, opposite)['caption_adherence']
  assert matching_score > opposite_score + 0.1
  assert music.attribute_scores(task.features(matching))[word] > 0.8
  assert music.attribute_scores(task.features(opposite))[word] < 0.2


def test_demonstrations_fit_their_caption_and_not_the_opposite(task):
  rng = np.random.default_rng(4)
  own, opposite = [], []
  for caption in music.all_captions():
    prompt = task.prompt_from_id(caption)
    flipped = task.prompt_from_id(' '.join(OPPOSITE[w] for w in caption.split()))
    for _ in range(2):
      completion = task.demonstration(prompt, rng)
      own.append(task.reward_components(prompt, completion)['caption_adherence'])
      opposite.append(task.reward_components(flipped, completion)['caption_adherence'])
  assert np.mean(own) > 0.9 and min(own) > 0.8
  assert np.mean(opposite) < 0.1


def test_reward_is_the_sum_of_weighted_components(task):
  prompt = task.prompt_from_id(BASE_CAPTION)
  completion = _demo_tokens(task, BASE_CAPTION)
  components = task.reward_components(prompt, completion)
  assert set(components) == {'caption_adherence', 'quality'}
  assert task.reward(prompt, completion) == pytest.approx(sum(components.values()))
  assert components['quality'] == pytest.approx(task.config.quality_weight)
  heavier = music.MusicTask(music.MusicTaskConfig(quality_weight=1.0))
  assert heavier.reward_components(prompt, completion)['quality'] == pytest.approx(1.0)


def test_quality_penalises_silence_clipping_and_octave_leaps():
  codec = codec_lib.SynthCodec()
  smooth = [codec.code(midi, 'soft', 'loud') for midi in (72, 75, 79, 75) * 6]
  leaping = [codec.code(midi, 'soft', 'loud') for midi in (48, 81) * 12]
  audio = codec.decode(smooth)

  def quality(waveform):
    return music.audio_quality(music.audio_features(waveform, codec.sample_rate))

  assert quality(audio) == pytest.approx(1.0)
  assert quality(np.zeros_like(audio)) == 0.0
  assert quality(np.clip(audio * 8, -1, 1)) < 0.5
  assert quality(codec.decode(leaping)) < 0.2


def test_diversity_reward_is_zero_for_the_same_audio_and_positive_otherwise(task):
  first = _demo_tokens(task, BASE_CAPTION, seed=5)
  second = _demo_tokens(task, BASE_CAPTION, seed=6)
  assert task.diversity_reward(first, list(first)) == pytest.approx(0.0, abs=1e-9)
  same_caption = task.diversity_reward(first, second)
  assert 0.0 < same_caption <= 2.0
  embedding = task.embedding(first)
  assert embedding.shape == (49,) and np.linalg.norm(embedding) == pytest.approx(1.0)
  silent = task.encode_completion([codec_lib.SynthCodec.REST] * 24)
  assert task.diversity_reward(first, silent) == pytest.approx(1.0)


def test_held_out_captions_are_never_training_prompts(task):
  rng = np.random.default_rng(7)
  train = {task.train_prompt(rng).prompt_id for _ in range(2000)}
  held_out = {prompt.prompt_id for prompt in task.eval_prompts()}
  assert len(held_out) == task.config.num_eval_captions
  assert not train & held_out
  assert train | held_out == set(music.all_captions())
  assert len(task.eval_prompts()) == 6 * task.config.eval_samples_per_caption
  assert [p.text for p in music.MusicTask().eval_prompts()] == [
      p.text for p in task.eval_prompts()]
  reseeded = music.MusicTask(music.MusicTaskConfig(heldout_seed=1))
  assert set(reseeded.eval_captions) != set(task.eval_captions)


@pytest.mark.parametrize('completion', [
    [],
    [models.EOS_ID],
    [models.PAD_ID] * 5,
    [models.BOS_ID, 3, 4, music.NULL_CAPTION_ID, 10_000, -5, 15, models.EOS_ID],
    list(range(-3, 80)),
    [20, 30, models.EOS_ID, 99_999, -1],
])
def test_bad_tokens_play_silence_and_never_crash_the_reward(task, completion):
  prompt = task.prompt_from_id(BASE_CAPTION)
  components = task.reward_components(prompt, completion)
  assert all(np.isfinite(value) and value >= 0 for value in components.values())
  assert np.isfinite(task.embedding(completion)).all()
  codes, valid = task.tokenizer.decode_codes(completion)
  audio = task.audio(completion).reshape(-1, task.codec.frame_samples) if codes.size else None
  if audio is not None:
    assert not np.any(audio[~valid])
  task.tokenizer.decode(completion)


def test_vocabulary_layout_and_readable_decoding(task):
  tokenizer = task.tokenizer
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.encode('slow fast low high major minor soft bright quiet loud') == list(
      range(3, 13))
  assert (music.NULL_CAPTION_ID, music.AUDIO_OFFSET, tokenizer.vocab_size) == (13, 14, 63)
  assert task.vocab_size == 63
  prompt = task.prompt_from_id(BASE_CAPTION)
  completion = _demo_tokens(task, BASE_CAPTION)
  assert task.encode_prompt(prompt) == [1, 4, 6, 8, 10, 12]
  assert len(task.encode_prompt(prompt)) == task.max_prompt_tokens
  assert len(completion) == task.max_answer_tokens == 25 and completion[-1] == models.EOS_ID
  assert tokenizer.decode(task.encode_prompt(prompt) + completion) == (
      'fast high minor bright loud | <audio 24 frames>')
  assert tokenizer.decode(task.unconditional_prompt_tokens()) == '<null>'
  assert task.encode_prompt(core.Prompt('', '', '')) == [models.BOS_ID, music.NULL_CAPTION_ID]
  with pytest.raises(ValueError, match='not in the vocabulary'):
    tokenizer.encode('fast funky')
  with pytest.raises(ValueError, match='names tempo twice'):
    music.parse_caption('fast slow')


def test_condition_dropout_emits_the_unconditional_prompt_at_rate_p_uncond(task):
  rng = np.random.default_rng(8)
  prompt = task.prompt_from_id(BASE_CAPTION)
  prompts = [tuple(task.demonstration_prompt_tokens(prompt, rng)) for _ in range(4000)]
  unconditional = np.mean([p == tuple(task.unconditional_prompt_tokens()) for p in prompts])
  assert abs(unconditional - task.config.p_uncond) < 0.02
  assert set(prompts) == {tuple(task.encode_prompt(prompt)),
                          tuple(task.unconditional_prompt_tokens())}
  never = music.MusicTask(music.MusicTaskConfig(p_uncond=0.0))
  assert all(never.demonstration_prompt_tokens(prompt, rng) == never.encode_prompt(prompt)
             for _ in range(100))


def test_music_task_is_registered_and_fits_the_demonstration_pipeline():
  task = tasks.make_task(music.MusicTaskConfig())
  rng = np.random.default_rng(9)
  prompt = task.train_prompt(rng)
  completion = task.demonstration(prompt, rng)
  assert task.reward(prompt, completion) > 0.9
  assert max(completion) < task.vocab_size
