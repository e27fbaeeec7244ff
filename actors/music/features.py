"""Signal features of a waveform: onsets, pitch, pitch classes, timbre, loudness, defects.

Everything is measured on the audio itself, not on the tokens that made it, so a learned
codec plugs in without touching the rewards computed from these features.
"""
import dataclasses
import functools

import numpy as np

# Hops of 10 ms for energy and onsets, windows of 50 ms for pitch.
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
_LOUDNESS_PERCENTILE = 95
_MAJOR_PITCH_CLASSES = (4, 9, 11)  # E, A, B: in C major, not in C minor.
_MINOR_PITCH_CLASSES = (3, 8, 10)  # Eb, Ab, Bb.


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
