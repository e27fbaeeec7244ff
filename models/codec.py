"""Audio codecs: discrete codes <-> waveform, and 16-bit WAV files.

A music model in Chorus is a token decoder over a codec's codes (MusicLM, MusicRL and
the diversity-rewarded CFG distillation paper use SoundStream/EnCodec-style codecs).
Nothing here downloads one, so `SynthCodec` is a small built-in codec that makes real,
audible audio: each code is one 100 ms frame of a synthesised note (a pitch from two
registers, a timbre, a loudness level) or a rest. A learned codec plugs in later by
implementing the `Codec` protocol; actors only call `decode` (and tests `encode`).
"""
import dataclasses
import wave
from typing import Protocol, runtime_checkable

import numpy as np

STANDARD_SAMPLE_RATE = 16_000


@runtime_checkable
class Codec(Protocol):
  """What actors need from an audio codec.

  Attributes:
    sample_rate: samples per second of decoded audio.
    frame_samples: samples per code (one code is one frame of audio).
    num_codes: codes are the integers [0, num_codes).
  """
  sample_rate: int
  frame_samples: int
  num_codes: int

  def decode(self, codes) -> np.ndarray:
    """[T] int codes -> [T * frame_samples] float32 waveform in [-1, 1]."""

  def encode(self, waveform) -> np.ndarray:
    """[T * frame_samples] waveform -> [T] int32 codes."""


@dataclasses.dataclass(frozen=True)
class Note:
  """What one `SynthCodec` code plays.

  Attributes:
    midi: MIDI pitch (60 is middle C).
    timbre: 'soft' (nearly a sine, flute-like) or 'bright' (many harmonics, brass-like).
    level: 'quiet' or 'loud' (12 dB apart).
  """
  midi: int
  timbre: str
  level: str


class SynthCodec:
  """A fixed codebook of synthesised note frames; decode is a table look-up.

  Code 0 is a rest (silence). Code 1 + (pitch * 2 + timbre) * 2 + level plays one note
  for the whole frame: a 5 ms attack, an exponential decay, and a 5 ms release to zero
  at the frame's end, so every note has an audible onset and frames join without
  clicks. Pitches are C, Eb, E, G, Ab and A in a low (C3..A3) and a high (C5..A5)
  register: enough for major (C E G A) and minor (C Eb G Ab) melodies in C. Frames are
  deterministic (every oscillator starts at phase 0) and all different, so
  `encode(decode(codes)) == codes`, also after a 16-bit WAV round trip.

  Args:
    sample_rate: samples per second.
    frame_ms: length of one code's frame.
  """
  PITCHES_MIDI = (48, 51, 52, 55, 56, 57, 72, 75, 76, 79, 80, 81)
  TIMBRES = ('soft', 'bright')
  LEVELS = ('quiet', 'loud')
  REST = 0
  # RMS of the steady tone before the envelope; 'quiet' is 12 dB below 'loud'.
  _LEVEL_RMS = {'quiet': 0.0625, 'loud': 0.25}
  # Harmonic amplitudes: 'soft' is a sine with a faint octave, 'bright' a sawtooth-like 1/n.
  _HARMONICS = {'soft': (1.0, 0.08), 'bright': tuple(1.0 / n for n in range(1, 11))}
  _ATTACK_S = 0.005
  _RELEASE_S = 0.005
  _DECAY_S = 0.06

  def __init__(self, sample_rate: int = STANDARD_SAMPLE_RATE, frame_ms: int = 100):
    frame_samples = sample_rate * frame_ms / 1000
    if frame_samples != int(frame_samples) or frame_samples < 64:
      raise ValueError(f'frame_ms={frame_ms} at sample_rate={sample_rate} must give a whole '
                       f'number of at least 64 samples; got {frame_samples}.')
    if _midi_to_hz(max(self.PITCHES_MIDI)) >= 0.45 * sample_rate:
      raise ValueError(f'sample_rate={sample_rate} is too low for the highest pitch; use '
                       f'{STANDARD_SAMPLE_RATE} or more.')
    self.sample_rate = sample_rate
    self.frame_samples = int(frame_samples)
    self._notes = [None] + [Note(midi, timbre, level) for midi in self.PITCHES_MIDI
                            for timbre in self.TIMBRES for level in self.LEVELS]
    self.num_codes = len(self._notes)
    self._frames = np.stack([self._synthesise(note) for note in self._notes]).astype(np.float32)
    self._frame_energy = np.sum(self._frames.astype(np.float64) ** 2, axis=1)

  def _synthesise(self, note: Note | None) -> np.ndarray:
    """[frame_samples] waveform of one code."""
    if note is None:
      return np.zeros(self.frame_samples)
    t = np.arange(self.frame_samples) / self.sample_rate
    f0 = _midi_to_hz(note.midi)
    tone = np.zeros_like(t)
    for n, amplitude in enumerate(self._HARMONICS[note.timbre], start=1):
      if n * f0 < 0.45 * self.sample_rate:  # Stay clear of aliasing.
        tone += amplitude * np.sin(2 * np.pi * n * f0 * t)
    tone *= self._LEVEL_RMS[note.level] / np.sqrt(np.mean(tone ** 2))
    attack = max(1, round(self._ATTACK_S * self.sample_rate))
    release = max(1, round(self._RELEASE_S * self.sample_rate))
    envelope = np.exp(-t / self._DECAY_S)
    envelope[:attack] *= np.arange(1, attack + 1) / attack
    envelope[-release:] *= np.arange(release - 1, -1, -1) / release
    return tone * envelope

  def note(self, code: int) -> Note | None:
    """The note a code plays; None for the rest."""
    if not 0 <= code < self.num_codes:
      raise ValueError(f'code {code} is outside [0, {self.num_codes}).')
    return self._notes[code]

  def code(self, midi: int, timbre: str, level: str) -> int:
    """The code that plays `Note(midi, timbre, level)`."""
    note = Note(int(midi), timbre, level)
    if note not in self._notes:
      raise ValueError(f'{note} is not in the codebook: pitches {self.PITCHES_MIDI}, '
                       f'timbres {self.TIMBRES}, levels {self.LEVELS}.')
    return self._notes.index(note)

  def decode(self, codes) -> np.ndarray:
    """Waveform of codes.

    Args:
      codes: [T] ints in [0, num_codes).

    Returns:
      [T * frame_samples] float32 in [-1, 1].
    """
    codes = np.asarray(codes)
    if codes.ndim != 1:
      raise ValueError(f'codes must be [T] (rank 1); got shape {codes.shape}.')
    if codes.size and (not np.issubdtype(codes.dtype, np.integer)
                       or codes.min() < 0 or codes.max() >= self.num_codes):
      raise ValueError(f'codes must be integers in [0, {self.num_codes}); got dtype '
                       f'{codes.dtype}, range [{codes.min()}, {codes.max()}]. Map other '
                       'tokens to SynthCodec.REST before decoding.')
    return self._frames[codes].reshape(-1)

  def encode(self, waveform) -> np.ndarray:
    """Nearest codebook frame of each frame of a waveform.

    Args:
      waveform: [T * frame_samples] float samples.

    Returns:
      [T] int32 codes.
    """
    waveform = np.asarray(waveform, np.float64)
    if waveform.ndim != 1 or waveform.size % self.frame_samples:
      raise ValueError(f'waveform must be [T * {self.frame_samples}] (whole frames); got '
                       f'shape {waveform.shape}. Trim or zero-pad it to whole frames.')
    frames = waveform.reshape(-1, self.frame_samples)
    distances = self._frame_energy[None, :] - 2.0 * frames @ self._frames.T.astype(np.float64)
    return np.argmin(distances, axis=1).astype(np.int32)


def _midi_to_hz(midi) -> float:
  return 440.0 * 2.0 ** ((np.asarray(midi, np.float64) - 69.0) / 12.0)


def write_wav(path, waveform, sample_rate: int) -> None:
  """Writes a mono 16-bit PCM WAV file.

  Args:
    path: file to write.
    waveform: [N] float samples; values beyond [-1, 1] are clipped.
    sample_rate: samples per second.
  """
  waveform = np.asarray(waveform, np.float64)
  if waveform.ndim != 1:
    raise ValueError(f'waveform must be mono [N]; got shape {waveform.shape}.')
  if not np.all(np.isfinite(waveform)):
    raise ValueError('waveform has NaN or infinite samples; fix the audio before writing.')
  pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype('<i2')
  with wave.open(str(path), 'wb') as file:
    file.setnchannels(1)
    file.setsampwidth(2)
    file.setframerate(int(sample_rate))
    file.writeframes(pcm.tobytes())


def read_wav(path) -> tuple[np.ndarray, int]:
  """Reads a 16-bit PCM WAV file.

  Args:
    path: file to read.

  Returns:
    ([N] float32 waveform in [-1, 1], channels averaged; sample_rate).
  """
  with wave.open(str(path), 'rb') as file:
    if file.getsampwidth() != 2:
      raise ValueError(f'{path} has {8 * file.getsampwidth()}-bit samples; only 16-bit PCM '
                       'is read. Convert it first (e.g. sox in.wav -b 16 out.wav).')
    channels, sample_rate = file.getnchannels(), file.getframerate()
    pcm = np.frombuffer(file.readframes(file.getnframes()), '<i2')
  waveform = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32767.0
  return waveform.astype(np.float32), sample_rate
