"""Rewards measured on audio features: caption adherence, quality, embedding, diversity."""
import numpy as np

from chorus.actors.music import captions
from chorus.actors.music import features as features_lib

# Attribute decision boundaries, midway between what the two values produce.
_TEMPO_MIDPOINT_HZ, _TEMPO_SCALE_HZ = 5.5, 0.75
_REGISTER_MIDPOINT_MIDI, _REGISTER_SCALE = 64.5, 2.5
_BRIGHTNESS_MIDPOINT, _BRIGHTNESS_SCALE_OCTAVES = 1.9, 0.25
_LOUDNESS_MIDPOINT_DB, _LOUDNESS_SCALE_DB = -20.0, 1.5
_FULL_ACTIVITY_ONSETS_HZ = 1.5  # Quality: fewer notes per second than this is too sparse.
_EMBEDDING_TIME_BINS = 16


def _sigmoid(x: float) -> float:
  return float(1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0))))


def attribute_scores(features: features_lib.AudioFeatures) -> dict[str, float]:
  """How well the audio fits each caption word, in [0, 1].

  Each attribute's two values score s and 1 - s, s a smooth step at the midpoint of what
  the two values sound like: 5.5 onsets/s (tempo), MIDI 64.5 (register), the
  major/minor pitch-class balance (mode), centroid / fundamental 1.9 (timbre), -20 dBFS
  (loudness). Audio with nothing pitched in it fits no word (all 0).

  Returns:
    {caption word: score} for every word of `captions.CAPTION_WORDS`.
  """
  if not features.has_music:
    return {word: 0.0 for word in captions.CAPTION_WORDS}
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
  for name, (first, second) in captions.ATTRIBUTES:
    scores[first], scores[second] = 1.0 - steps[name], steps[name]
  return scores


def caption_adherence(attributes: dict[str, str], features: features_lib.AudioFeatures) -> float:
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


def audio_quality(features: features_lib.AudioFeatures) -> float:
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


def audio_embedding(features: features_lib.AudioFeatures) -> np.ndarray:
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
