"""The caption-to-music task: captions, a composer of demonstrations, rewards of completions."""
import dataclasses
import hashlib

import numpy as np

from chorus import core
from chorus import models
from chorus.actors.music import captions
from chorus.actors.music import features as features_lib
from chorus.actors.music import rewards
from chorus.actors.music import tokenizer as tokenizer_lib
from chorus.core import Prompt
from chorus.models import codec as codec_lib

# The composer of demonstrations (`MusicTask.demonstration`).
_SCALES = {'major': (0, 4, 7, 9), 'minor': (0, 3, 7, 8)}  # C E G A / C Eb G Ab.
_REGISTER_BASE_MIDI = {'low': 48, 'high': 72}
_FAST_NOTE_PROBABILITY = 0.9  # Fast: a note in 90% of frames, rests otherwise.
_SLOW_GAPS_FRAMES = (3, 4)  # Slow: a note every 3 or 4 frames.
_MELODY_STEPS = (-2, -1, -1, 0, 1, 1, 2)


@dataclasses.dataclass(frozen=True)
class MusicTaskConfig(core.TaskConfig, tag='music_captions'):
  """Caption-to-music with rewards measured on the decoded audio.

  Attributes:
    num_frames: audio frames per completion (100 ms each with SynthCodec: 2.4 s).
    p_uncond: probability that a corpus example's prompt is the unconditional
      [BOS, NULL_CAPTION] (condition dropout, so the model learns pi(.|null) for CFG).
    num_eval_captions: full captions (of 32) held out from training, chosen by hash, so
      evaluation measures unseen attribute combinations.
    eval_samples_per_caption: how often each held-out caption appears in `eval_prompts`.
    heldout_seed: salt of the hash that picks the held-out captions.
    adherence_weight: weight of 'caption_adherence' (a [0, 1] score) in the reward.
    quality_weight: weight of 'quality' (a [0, 1] score) in the reward.
  """
  num_frames: int = 24
  p_uncond: float = 0.15
  num_eval_captions: int = 6
  eval_samples_per_caption: int = 4
  heldout_seed: int = 0
  adherence_weight: float = 1.0
  quality_weight: float = 0.2

  def __post_init__(self):
    if self.num_frames < 1:
      raise ValueError(f'num_frames must be >= 1; got {self.num_frames}.')
    if not 0 <= self.p_uncond <= 1:
      raise ValueError(f'p_uncond must be in [0, 1]; got {self.p_uncond}.')
    num_captions = len(captions.all_captions())
    if not 1 <= self.num_eval_captions < num_captions:
      raise ValueError(f'num_eval_captions must be in [1, {num_captions}) so both train and '
                       f'eval captions exist; got {self.num_eval_captions}.')
    if self.eval_samples_per_caption < 1:
      raise ValueError(
          f'eval_samples_per_caption must be >= 1; got {self.eval_samples_per_caption}.')


class MusicTask:
  """Captions, a synthetic caption-audio corpus and audio-measured rewards.

  The reward is the sum of `reward_components`: adherence_weight * caption adherence
  plus quality_weight * quality, both in [0, 1] before weighting. `diversity_reward`
  scores a pair of completions for the same caption.

  Args:
    config: the task's settings.
    codec: tokens <-> audio; the built-in `SynthCodec` by default. Demonstrations are
      composed for SynthCodec and, for another codec of the same sample rate, rendered
      with it and re-encoded by `codec.encode`.
  """
  name = 'music_captions'
  # A clip is `num_frames` long by construction: reaching the length cap ends the episode
  # (a terminal state), it does not cut it short. Bootstrapping values there instead,
  # with gamma = 1, let V-trace's value targets grow without bound (measured: 1 -> 11).
  ends_at_length_cap = True

  def __init__(self, config: MusicTaskConfig = MusicTaskConfig(),
               codec: codec_lib.Codec | None = None):
    self.config = config
    self._composer = codec_lib.SynthCodec()
    self.codec = codec if codec is not None else self._composer
    if not isinstance(self.codec, codec_lib.Codec):
      raise TypeError(f'codec {self.codec!r} lacks the Codec interface (sample_rate, '
                      'frame_samples, num_codes, decode, encode).')
    self.tokenizer = tokenizer_lib.MusicTokenizer(self.codec.num_codes)
    ranked = sorted(captions.all_captions(), key=lambda caption: hashlib.sha256(
        f'{config.heldout_seed}:{caption}'.encode()).digest())
    self.eval_captions = sorted(ranked[:config.num_eval_captions])
    self.train_captions = sorted(ranked[config.num_eval_captions:])

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def max_prompt_tokens(self) -> int:
    return 1 + len(captions.ATTRIBUTES)

  @property
  def max_answer_tokens(self) -> int:
    return self.config.num_frames + 1  # Frames and EOS.

  @staticmethod
  def prompt_from_id(caption: str) -> Prompt:
    """The Prompt of a caption such as 'fast high minor bright loud' (checked)."""
    captions.parse_caption(caption)
    return Prompt(prompt_id=caption, text=caption, answer='')

  def train_prompt(self, rng: np.random.Generator) -> Prompt:
    """A random training caption; never a held-out one."""
    return self.prompt_from_id(self.train_captions[int(rng.integers(len(self.train_captions)))])

  def eval_prompts(self) -> list[Prompt]:
    """The held-out captions, each `eval_samples_per_caption` times (fixed everywhere)."""
    return [self.prompt_from_id(caption) for caption in self.eval_captions
            for _ in range(self.config.eval_samples_per_caption)]

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    """[BOS, caption words...]; [BOS, NULL_CAPTION] for an empty caption."""
    words = self.tokenizer.encode(prompt.text)
    return [models.BOS_ID] + (words or [tokenizer_lib.NULL_CAPTION_ID])

  def unconditional_prompt_tokens(self) -> list[int]:
    """[BOS, NULL_CAPTION]: the prompt of pi(.|null) for classifier-free guidance."""
    return [models.BOS_ID, tokenizer_lib.NULL_CAPTION_ID]

  def demonstration_prompt_tokens(self, prompt: Prompt,
                                  rng: np.random.Generator) -> list[int]:
    """The corpus prompt of a demonstration: condition dropout for CFG.

    `encode_prompt(prompt)`, or with probability `config.p_uncond` the unconditional
    prompt. Use it where a warm start would call `encode_prompt` on demonstrations.
    """
    if rng.random() < self.config.p_uncond:
      return self.unconditional_prompt_tokens()
    return self.encode_prompt(prompt)

  def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    """A composition that fits the caption as completion tokens (EOS last)."""
    return self.encode_completion(self.demonstration_codes(prompt, rng))

  def demonstration_codes(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    """A composition that fits the caption, as `num_frames` codec codes.

    Notes come from the caption's register and mode (C E G A or C Eb G Ab), a melody
    of small steps from C back to C; 'fast' plays a note in about 90% of the frames,
    'slow' one every 3-4 frames; every note has the caption's timbre and loudness.
    Attributes the caption leaves out are drawn at random.
    """
    attributes = captions.parse_caption(prompt.text)
    for name, values in captions.ATTRIBUTES:
      attributes.setdefault(name, values[int(rng.integers(len(values)))])
    num_frames = self.config.num_frames
    if self.codec is not self._composer:  # Compose as long as the codec's completion.
      num_frames = -(-num_frames * self.codec.frame_samples // self._composer.frame_samples)
    if attributes['tempo'] == 'fast':
      onsets = np.flatnonzero(rng.random(num_frames) < _FAST_NOTE_PROBABILITY)
      onsets = np.union1d([0], onsets)
    else:
      gaps = rng.choice(_SLOW_GAPS_FRAMES, size=num_frames)
      onsets = np.cumsum(np.concatenate([[0], gaps]))
      onsets = onsets[onsets < num_frames]
    scale = _SCALES[attributes['mode']]
    top = len(scale) - 1
    degree, degrees = 0, []
    for _ in range(len(onsets)):
      degrees.append(degree)
      degree = abs(degree + int(rng.choice(_MELODY_STEPS)))  # Reflect at both ends.
      degree = 2 * top - degree if degree > top else degree
    degrees[-1] = 0  # End on the tonic.
    if len(degrees) > 1 and not {1, 3} & set(degrees):
      degrees[len(degrees) // 2] = 1  # Let the mode's third be heard.
    base = _REGISTER_BASE_MIDI[attributes['register']]
    codes = np.full(num_frames, codec_lib.SynthCodec.REST, np.int64)
    for onset, degree in zip(onsets.tolist(), degrees):
      codes[onset] = self._composer.code(base + scale[degree], attributes['timbre'],
                                         attributes['loudness'])
    if self.codec is self._composer:
      return codes.tolist()
    return self._reencode(self._composer.decode(codes)).tolist()

  def _reencode(self, waveform: np.ndarray) -> np.ndarray:
    if self.codec.sample_rate != self._composer.sample_rate:
      raise ValueError(
          f'Demonstrations are rendered at {self._composer.sample_rate} Hz but the codec '
          f'runs at {self.codec.sample_rate} Hz; resample or bring a corpus for it.')
    frames = -(-waveform.size // self.codec.frame_samples)
    padded = np.zeros(frames * self.codec.frame_samples, np.float32)
    padded[:waveform.size] = waveform
    return np.asarray(self.codec.encode(padded))[:self.config.num_frames]

  def encode_completion(self, codes) -> list[int]:
    """Token ids of codec codes, then EOS."""
    return self.tokenizer.encode_codes(codes) + [models.EOS_ID]

  def audio(self, completion_tokens) -> np.ndarray:
    """[T * frame_samples] float32 waveform of a completion, up to its first EOS.

    Tokens that are not audio codes (PAD, BOS, caption words, out of range) play a
    frame of silence rather than failing: a policy may sample anything.
    """
    codes, valid = self.tokenizer.decode_codes(completion_tokens)
    if not codes.size:
      return np.zeros(0, np.float32)
    frames = np.asarray(self.codec.decode(codes), np.float32).reshape(codes.size, -1)
    return np.where(valid[:, None], frames, 0.0).reshape(-1).astype(np.float32)

  def write_audio(self, path, completion_tokens) -> None:
    """Writes a completion as a 16-bit WAV file to listen to."""
    codec_lib.write_wav(path, self.audio(completion_tokens), self.codec.sample_rate)

  def features(self, completion_tokens) -> features_lib.AudioFeatures:
    """`audio_features` of the completion's decoded audio."""
    return features_lib.audio_features(self.audio(completion_tokens), self.codec.sample_rate)

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """Weighted reward terms, measured on the decoded audio; they sum to `reward`.

    'caption_adherence': adherence_weight * mean over the caption's attributes of how
    well the audio fits each (`attribute_scores`); 'quality': quality_weight *
    `audio_quality`.
    """
    features = self.features(completion_tokens)
    adherence = rewards.caption_adherence(captions.parse_caption(prompt.text), features)
    return {
        'caption_adherence': self.config.adherence_weight * adherence,
        'quality': self.config.quality_weight * rewards.audio_quality(features),
    }

  def reward(self, prompt: Prompt, completion_tokens) -> float:
    """The total reward: the sum of `reward_components`."""
    return sum(self.reward_components(prompt, completion_tokens).values())

  def embedding(self, completion_tokens) -> np.ndarray:
    """E(x): [49] unit vector of the completion's audio (`audio_embedding`)."""
    return rewards.audio_embedding(self.features(completion_tokens))

  def diversity_reward(self, tokens_a, tokens_b) -> float:
    """1 - cos(E(a), E(b)) of two completions (for the same caption), in [0, 2]."""
    return rewards.diversity(self.embedding(tokens_a), self.embedding(tokens_b))
