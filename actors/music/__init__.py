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

Modules, each importing only those above it: `captions` (the caption vocabulary),
`tokenizer` (the token layout), `features` (signal features of a waveform), `rewards`
(scores computed from features) and `task` (`MusicTask`). This package re-exports their
public names.
"""
from chorus.actors.music.captions import all_captions
from chorus.actors.music.captions import ATTRIBUTES
from chorus.actors.music.captions import CAPTION_WORDS
from chorus.actors.music.captions import NULL_CAPTION_WORD
from chorus.actors.music.captions import parse_caption
from chorus.actors.music.features import audio_features
from chorus.actors.music.features import AudioFeatures
from chorus.actors.music.rewards import attribute_scores
from chorus.actors.music.rewards import audio_embedding
from chorus.actors.music.rewards import audio_quality
from chorus.actors.music.rewards import caption_adherence
from chorus.actors.music.rewards import diversity
from chorus.actors.music.task import MusicTask
from chorus.actors.music.task import MusicTaskConfig
from chorus.actors.music.tokenizer import AUDIO_OFFSET
from chorus.actors.music.tokenizer import CAPTION_OFFSET
from chorus.actors.music.tokenizer import MusicTokenizer
from chorus.actors.music.tokenizer import NULL_CAPTION_ID
