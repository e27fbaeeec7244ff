"""Built-in music task: captions -> codec tokens -> audio -> rewards measured on the audio.

The music model is the text model's decoder over one joint vocabulary (`MusicTokenizer`):

    0 PAD, 1 BOS, 2 EOS                       (as chorus.models.tokenizer)
    3..12  caption words: slow fast | low high | major minor | soft bright | quiet loud
    13     NULL_CAPTION: the unconditional prompt [BOS, NULL_CAPTION] of classifier-free
           guidance
    14..   audio codes: token 14 + c is codec code c (49 codes for SynthCodec: 14..62)

A prompt is [BOS, tempo, register, mode, timbre, loudness] (one word per attribute, in
that order); a completion is `num_frames` audio tokens then EOS. The actor decodes the
tokens to a waveform with the codec and computes every reward from the waveform, not
from the tokens, so a learned codec plugs in without touching the rewards:
onset rate (tempo), median pitch (register), pitch-class content (mode; the key is C
throughout), spectral centroid over the fundamental (timbre) and level (loudness).

Condition dropout for the warm start: `demonstration_prompt_tokens(prompt, rng)` is
`encode_prompt(prompt)`, except with probability `config.p_uncond` it is the
unconditional prompt [BOS, NULL_CAPTION]. Training on those teaches the decoder both pi(.|c) and
pi(.|null), which CFG (learners/cfg_distill.py) combines.
"""
import dataclasses
import functools
import hashlib
import itertools

import numpy as np

from chorus import models
from chorus.core import Prompt
from chorus.models import codec as codec_lib

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
CAPTION_OFFSET = 3
NULL_CAPTION_ID = CAPTION_OFFSET + len(CAPTION_WORDS)
AUDIO_OFFSET = NULL_CAPTION_ID + 1
_ATTRIBUTE_OF_WORD = {word: name for name, values in ATTRIBUTES for word in values}

# Feature extraction. Hops of 10 ms for energy and onsets, windows of 50 ms for pitch.
_HOP_S = 0.01
_PITCH_WINDOW_S = 0.05
_MIN_F0_HZ = 70.0
_MAX_F0_HZ = 1000.0
_SILENCE_RMS = 0.003  # About -50 dBFS.
_ONSET_RATIO = 2.0  # An onset at least doubles the previous hop's RMS (+6 dB).
_ONSET_FLOOR_RMS = 0.001
_ONSET_REFRACTORY_S = 0.03
_VOICING_THRESHOLD = 0.5  # Normalised autocorrelation at the period.
_OCTAVE_TOLERANCE = 0.85  # The shortest-lag peak within 85% of the best is the period.
_CLIP_LEVEL = 0.999
_LEAP_SEMITONES = 12  # Larger melodic jumps between notes count as harsh.
# Attribute decision boundaries, midway between what the two values produce.
_TEMPO_MIDPOINT_HZ, _TEMPO_SCALE_HZ = 5.5, 0.75
_REGISTER_MIDPOINT_MIDI, _REGISTER_SCALE = 64.5, 2.5
_BRIGHTNESS_MIDPOINT, _BRIGHTNESS_SCALE_OCTAVES = 1.9, 0.25
_LOUDNESS_MIDPOINT_DB, _LOUDNESS_SCALE_DB = -20.0, 1.5
_LOUDNESS_PERCENTILE = 95
_MAJOR_PITCH_CLASSES = (4, 9, 11)  # E, A, B: in C major, not in C minor.
_MINOR_PITCH_CLASSES = (3, 8, 10)  # Eb, Ab, Bb.
_FULL_ACTIVITY_ONSETS_HZ = 1.5  # Quality: fewer notes per second than this is too sparse.
_EMBEDDING_TIME_BINS = 16

# The composer of demonstrations (`MusicTask.demonstration`).
_SCALES = {'major': (0, 4, 7, 9), 'minor': (0, 3, 7, 8)}  # C E G A / C Eb G Ab.
_REGISTER_BASE_MIDI = {'low': 48, 'high': 72}
_FAST_NOTE_PROBABILITY = 0.9  # Fast: a note in 90% of frames, rests otherwise.
_SLOW_GAPS_FRAMES = (3, 4)  # Slow: a note every 3 or 4 frames.
_MELODY_STEPS = (-2, -1, -1, 0, 1, 1, 2)


class MusicTokenizer:
  """The joint caption + audio-code vocabulary (layout in the module docstring).

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
    self._word_ids = {word: CAPTION_OFFSET + i for i, word in enumerate(CAPTION_WORDS)}
    self._word_ids[NULL_CAPTION_WORD] = NULL_CAPTION_ID
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


@dataclasses.dataclass(frozen=True, eq=False)
class AudioFeatures:
  """What `audio_features` measures on a waveform.

  Attributes:
    duration_s: length of the audio.
    onset_times_s: [N] note onsets (energy rising by 6 dB or more from one 10 ms hop to
      the next, above -50 dBFS).
    onset_rate_hz: onsets per second (tempo).
    window_times_s: [W] start of each 50 ms pitch window.
    window_midi: [W] fundamental of each window as a fractional MIDI pitch
      (autocorrelation), NaN where the window is silent or unpitched.
    window_rms: [W] RMS of each window.
    median_midi: RMS-weighted median of `window_midi` over pitched windows; NaN if none.
    pitch_class_histogram: [12] RMS-weighted share of each pitch class (C=0), summing
      to 1 (zeros if nothing is pitched).
    major_minor_balance: in [-1, 1]: (major - minor) / (major + minor) of the histogram
      mass on E, A, B (in C major only) and Eb, Ab, Bb (in C minor only); 0 if neither.
    harmonic_brightness: RMS-weighted median of spectral centroid / fundamental (about 1
      for a sine, 3 for a sawtooth-like tone); NaN if nothing is pitched. Dividing by the
      fundamental keeps timbre apart from register.
    spectral_centroid_hz: RMS-weighted mean spectral centroid of the pitched windows.
    loudness_db: dBFS of the 95th percentile of the 10 ms hops' RMS (-inf for silence).
    pitched_fraction: share of the windows that are pitched.
    clip_fraction: share of samples at full scale (|x| >= 0.999).
    leap_fraction: share of pitch changes between pitched windows larger than an octave.
  """
  duration_s: float
  onset_times_s: np.ndarray
  onset_rate_hz: float
  window_times_s: np.ndarray
  window_midi: np.ndarray
  window_rms: np.ndarray
  median_midi: float
  pitch_class_histogram: np.ndarray
  major_minor_balance: float
  harmonic_brightness: float
  spectral_centroid_hz: float
  loudness_db: float
  pitched_fraction: float
  clip_fraction: float
  leap_fraction: float

  @property
  def has_music(self) -> bool:
    """Whether anything pitched was heard."""
    return bool(np.any(np.isfinite(self.window_midi)))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
  order = np.argsort(values)
  cumulative = np.cumsum(weights[order])
  return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _onsets(hop_rms: np.ndarray, hop_s: float) -> np.ndarray:
  previous = np.concatenate([[0.0], hop_rms[:-1]])
  candidates = np.flatnonzero((hop_rms > _SILENCE_RMS)
                              & (hop_rms > _ONSET_RATIO * previous + _ONSET_FLOOR_RMS))
  refractory_hops = max(1, round(_ONSET_REFRACTORY_S / hop_s))
  onsets = []
  for hop in candidates.tolist():
    if not onsets or hop - onsets[-1] >= refractory_hops:
      onsets.append(hop)
  return np.asarray(onsets, np.float64) * hop_s


def _fft_length(minimum: int) -> int:
  """The smallest 2^a 3^b 5^c >= minimum: fast for pocketfft, little zero padding."""
  best = 1 << int(np.ceil(np.log2(minimum)))
  for power3 in (1, 3, 9, 27, 81):
    for power5 in (1, 5, 25, 125):
      odd = power3 * power5
      if odd <= best:
        candidate = odd << max(0, int(np.ceil(np.log2(minimum / odd))))
        best = min(best, candidate)
  return best


@functools.lru_cache(maxsize=16)
def _taper(window: int, nfft: int, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
  """Hann taper [window] and its normalised autocorrelation [max_lag + 2]."""
  taper = np.hanning(window)
  autocorrelation = np.fft.irfft(np.abs(np.fft.rfft(taper, nfft)) ** 2, nfft)[:max_lag + 2]
  return taper, autocorrelation / autocorrelation[0]


def _pitch_and_centroid(frames: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
  """Fundamental (Hz, NaN if unpitched) and spectral centroid (Hz) of [W, N] frames."""
  num_windows, window = frames.shape
  min_lag = max(2, int(np.floor(sample_rate / _MAX_F0_HZ)))
  max_lag = min(window // 2, int(np.ceil(sample_rate / _MIN_F0_HZ)))
  if num_windows == 0 or max_lag <= min_lag + 1:
    return np.full(num_windows, np.nan), np.full(num_windows, np.nan)
  nfft = _fft_length(window + max_lag + 2)  # No circular wrap-around up to max_lag.
  taper, taper_autocorrelation = _taper(window, nfft, max_lag)
  spectrum = np.fft.rfft(frames * taper, nfft)
  magnitude = np.abs(spectrum)
  freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
  centroid = (magnitude @ freqs) / np.maximum(magnitude.sum(axis=1), 1e-12)
  # Autocorrelation, divided by the taper's own so a periodic signal scores ~1 at its
  # period whatever the lag (Boersma 1993).
  autocorrelation = np.fft.irfft(magnitude ** 2, nfft)[:, :max_lag + 2]
  normalised = (autocorrelation / np.maximum(autocorrelation[:, :1], 1e-12)
                / taper_autocorrelation)
  lags = np.arange(min_lag, max_lag + 1)
  values = normalised[:, lags]
  local_max = (values >= normalised[:, lags - 1]) & (values > normalised[:, lags + 1])
  best = np.max(np.where(local_max, values, -np.inf), axis=1)
  candidates = local_max & (values >= _OCTAVE_TOLERANCE * best[:, None])
  index = np.argmax(candidates, axis=1)  # The shortest qualifying lag: no octave-down error.
  rows = np.arange(num_windows)
  lag = lags[index]
  peak = values[rows, index]
  below, above = normalised[rows, lag - 1], normalised[rows, lag + 1]
  curvature = below - 2.0 * peak + above
  shift = np.where(curvature < 0, 0.5 * (below - above) / np.where(curvature < 0, curvature, -1.0),
                   0.0)
  pitched = candidates.any(axis=1) & (peak > _VOICING_THRESHOLD)
  f0 = np.where(pitched, sample_rate / (lag + np.clip(shift, -0.5, 0.5)), np.nan)
  return f0, centroid


def audio_features(waveform, sample_rate: int) -> AudioFeatures:
  """Measures tempo, pitch, mode, timbre, loudness and defects of mono audio.

  Args:
    waveform: [N] float samples in [-1, 1]; NaN counts as silence.
    sample_rate: samples per second.

  Returns:
    The `AudioFeatures` of the waveform; silence and empty audio give zeros and NaNs,
    never an error.
  """
  samples = np.nan_to_num(np.asarray(waveform, np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
  if samples.ndim != 1:
    raise ValueError(f'waveform must be mono [N]; got shape {samples.shape}. Average the '
                     'channels first.')
  if sample_rate <= 0:
    raise ValueError(f'sample_rate must be positive; got {sample_rate}.')
  duration_s = samples.size / sample_rate
  hop = max(1, round(_HOP_S * sample_rate))
  num_hops = samples.size // hop
  hop_rms = np.sqrt(np.mean(samples[:num_hops * hop].reshape(num_hops, hop) ** 2, axis=1))
  onset_times_s = _onsets(hop_rms, hop / sample_rate)

  window = max(1, round(_PITCH_WINDOW_S * sample_rate))
  num_windows = samples.size // window
  frames = samples[:num_windows * window].reshape(num_windows, window)
  window_rms = np.sqrt(np.mean(frames ** 2, axis=1))
  f0, centroid = _pitch_and_centroid(frames, sample_rate)
  f0 = np.where(window_rms > _SILENCE_RMS, f0, np.nan)
  pitched = np.isfinite(f0)
  window_midi = np.where(pitched, 69.0 + 12.0 * np.log2(np.where(pitched, f0, 440.0) / 440.0),
                         np.nan)

  histogram = np.zeros(12)
  median_midi = harmonic_brightness = spectral_centroid_hz = float('nan')
  leap_fraction = 0.0
  if pitched.any():
    weights, midi = window_rms[pitched], window_midi[pitched]
    histogram = np.bincount(np.round(midi).astype(np.int64) % 12, weights, minlength=12)
    histogram = histogram / histogram.sum()
    median_midi = _weighted_median(midi, weights)
    harmonic_brightness = _weighted_median(centroid[pitched] / f0[pitched], weights)
    spectral_centroid_hz = float(np.average(centroid[pitched], weights=weights))
    changes = np.abs(np.diff(np.round(midi)))
    changes = changes[changes > 0]
    leap_fraction = float(np.mean(changes > _LEAP_SEMITONES)) if changes.size else 0.0
  major = histogram[list(_MAJOR_PITCH_CLASSES)].sum()
  minor = histogram[list(_MINOR_PITCH_CLASSES)].sum()
  balance = float((major - minor) / (major + minor)) if major + minor > 0 else 0.0
  level = np.percentile(hop_rms, _LOUDNESS_PERCENTILE) if num_hops else 0.0
  return AudioFeatures(
      duration_s=duration_s,
      onset_times_s=onset_times_s,
      onset_rate_hz=len(onset_times_s) / duration_s if duration_s > 0 else 0.0,
      window_times_s=np.arange(num_windows) * window / sample_rate,
      window_midi=window_midi,
      window_rms=window_rms,
      median_midi=median_midi,
      pitch_class_histogram=histogram,
      major_minor_balance=balance,
      harmonic_brightness=harmonic_brightness,
      spectral_centroid_hz=spectral_centroid_hz,
      loudness_db=float(20.0 * np.log10(level)) if level > 0 else float('-inf'),
      pitched_fraction=float(pitched.mean()) if num_windows else 0.0,
      clip_fraction=float(np.mean(np.abs(samples) >= _CLIP_LEVEL)) if samples.size else 0.0,
      leap_fraction=leap_fraction)


def _sigmoid(x: float) -> float:
  return float(1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0))))


def attribute_scores(features: AudioFeatures) -> dict[str, float]:
  """How well the audio fits each caption word, in [0, 1].

  Each attribute's two values score s and 1 - s, s a smooth step at the midpoint of what
  the two values sound like: 5.5 onsets/s (tempo), MIDI 64.5 (register), the
  major/minor pitch-class balance (mode), centroid / fundamental 1.9 (timbre), -20 dBFS
  (loudness). Audio with nothing pitched in it fits no word (all 0).

  Returns:
    {caption word: score} for every word of `CAPTION_WORDS`.
  """
  if not features.has_music:
    return {word: 0.0 for word in CAPTION_WORDS}
  steps = {
      'tempo': _sigmoid((features.onset_rate_hz - _TEMPO_MIDPOINT_HZ) / _TEMPO_SCALE_HZ),
      'register': _sigmoid((features.median_midi - _REGISTER_MIDPOINT_MIDI) / _REGISTER_SCALE),
      'mode': 0.5 * (1.0 - features.major_minor_balance),
      'timbre': _sigmoid(np.log2(features.harmonic_brightness / _BRIGHTNESS_MIDPOINT)
                         / _BRIGHTNESS_SCALE_OCTAVES),
      'loudness': _sigmoid((features.loudness_db - _LOUDNESS_MIDPOINT_DB) / _LOUDNESS_SCALE_DB),
  }
  # The step is the score of each attribute's second value (fast, high, minor, ...).
  scores = {}
  for name, (first, second) in ATTRIBUTES:
    scores[first], scores[second] = 1.0 - steps[name], steps[name]
  return scores


def caption_adherence(attributes: dict[str, str], features: AudioFeatures) -> float:
  """Mean over the caption's attributes of `attribute_scores`, in [0, 1].

  Args:
    attributes: {attribute: value}, e.g. from `parse_caption`; empty for the
      unconditional caption, which any audio with music in it fits (1), silence not (0).
    features: the audio's `audio_features`.
  """
  if not attributes:
    return float(features.has_music)
  scores = attribute_scores(features)
  return float(np.mean([scores[value] for value in attributes.values()]))


def audio_quality(features: AudioFeatures) -> float:
  """A caption-free quality score in [0, 1]: activity x no clipping x smooth melody.

  Activity is min(1, onset rate / 1.5 per second) (silence and near-silence score 0);
  clipping costs 10x its share of samples; melodic leaps over an octave cost their
  share of the pitch changes.
  """
  activity = min(1.0, features.onset_rate_hz / _FULL_ACTIVITY_ONSETS_HZ)
  unclipped = 1.0 - min(1.0, 10.0 * features.clip_fraction)
  return float(activity * unclipped * (1.0 - features.leap_fraction))


def _unit(vector: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(vector)
  return vector / norm if norm > 0 else vector


def audio_embedding(features: AudioFeatures) -> np.ndarray:
  """E(x): a unit vector of what the audio sounds like, for the diversity reward.

  Four equally weighted unit blocks: the pitch-class histogram [12], the onset pattern
  over 16 time bins [16], the melodic contour (mean pitch per time bin minus the median,
  in octaves) [16], and the global tempo, register, timbre and loudness [4]; then one
  dimension that is 1 only for audio without music. Time bins divide the audio's own
  duration, so two clips of the same length compare moment by moment.

  Returns:
    [49] float64 with norm 1.
  """
  bins = _EMBEDDING_TIME_BINS
  duration = max(features.duration_s, 1e-9)
  onset_pattern = np.bincount(
      np.minimum((features.onset_times_s / duration * bins).astype(np.int64), bins - 1),
      minlength=bins).astype(np.float64)
  contour = np.zeros(bins)
  globals_ = np.zeros(4)
  if features.has_music:
    pitched = np.isfinite(features.window_midi)
    time_bin = np.minimum((features.window_times_s[pitched] / duration * bins).astype(np.int64),
                          bins - 1)
    offsets = (features.window_midi[pitched] - features.median_midi) / 12.0
    counts = np.bincount(time_bin, minlength=bins)
    contour = np.bincount(time_bin, offsets, minlength=bins) / np.maximum(counts, 1)
    globals_ = np.array([
        (features.onset_rate_hz - _TEMPO_MIDPOINT_HZ) / _TEMPO_MIDPOINT_HZ,
        (features.median_midi - _REGISTER_MIDPOINT_MIDI) / 12.0,
        np.log2(features.harmonic_brightness / _BRIGHTNESS_MIDPOINT),
        (features.loudness_db - _LOUDNESS_MIDPOINT_DB) / 12.0])
  silence = np.array([0.0 if features.has_music else 1.0])
  blocks = [features.pitch_class_histogram, onset_pattern, contour, globals_]
  return _unit(np.concatenate([_unit(np.asarray(b, np.float64)) for b in blocks] + [silence]))


def diversity(embedding_a: np.ndarray, embedding_b: np.ndarray) -> float:
  """1 - cos(E(a), E(b)) of two embeddings, in [0, 2]; 0 for the same audio."""
  cosine = float(np.dot(_unit(embedding_a), _unit(embedding_b)))
  return max(0.0, 1.0 - cosine)


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


@dataclasses.dataclass(frozen=True)
class MusicTaskConfig:
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
    num_captions = len(all_captions())
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
    self.tokenizer = MusicTokenizer(self.codec.num_codes)
    ranked = sorted(all_captions(), key=lambda caption: hashlib.sha256(
        f'{config.heldout_seed}:{caption}'.encode()).digest())
    self.eval_captions = sorted(ranked[:config.num_eval_captions])
    self.train_captions = sorted(ranked[config.num_eval_captions:])

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def max_prompt_tokens(self) -> int:
    return 1 + len(ATTRIBUTES)

  @property
  def max_answer_tokens(self) -> int:
    return self.config.num_frames + 1  # Frames and EOS.

  @staticmethod
  def prompt_from_id(caption: str) -> Prompt:
    """The Prompt of a caption such as 'fast high minor bright loud' (checked)."""
    parse_caption(caption)
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
    return [models.BOS_ID] + (words or [NULL_CAPTION_ID])

  def unconditional_prompt_tokens(self) -> list[int]:
    """[BOS, NULL_CAPTION]: the prompt of pi(.|null) for classifier-free guidance."""
    return [models.BOS_ID, NULL_CAPTION_ID]

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
    attributes = parse_caption(prompt.text)
    for name, values in ATTRIBUTES:
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

  def features(self, completion_tokens) -> AudioFeatures:
    """`audio_features` of the completion's decoded audio."""
    return audio_features(self.audio(completion_tokens), self.codec.sample_rate)

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """Weighted reward terms, measured on the decoded audio; they sum to `reward`.

    'caption_adherence': adherence_weight * mean over the caption's attributes of how
    well the audio fits each (`attribute_scores`); 'quality': quality_weight *
    `audio_quality`.
    """
    features = self.features(completion_tokens)
    return {
        'caption_adherence': self.config.adherence_weight
                             * caption_adherence(parse_caption(prompt.text), features),
        'quality': self.config.quality_weight * audio_quality(features),
    }

  def reward(self, prompt: Prompt, completion_tokens) -> float:
    """The total reward: the sum of `reward_components`."""
    return sum(self.reward_components(prompt, completion_tokens).values())

  def embedding(self, completion_tokens) -> np.ndarray:
    """E(x): [49] unit vector of the completion's audio (`audio_embedding`)."""
    return audio_embedding(self.features(completion_tokens))

  def diversity_reward(self, tokens_a, tokens_b) -> float:
    """1 - cos(E(a), E(b)) of two completions (for the same caption), in [0, 2]."""
    return diversity(self.embedding(tokens_a), self.embedding(tokens_b))
