"""A served model: one named model's kind, parameters, version and the lanes that serve it."""
import concurrent.futures
import dataclasses
import functools
import threading
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

from chorus import core
from chorus import models
from chorus.inference_server import param_stream
from chorus.inference_server import scoring as scoring_lib
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.lanes import DynamicLane
from chorus.inference_server.lanes import Row
from chorus.inference_server.lanes import ScoreRow
from chorus.inference_server.lanes import ScoringLane
from chorus.inference_server.scheduler import ContinuousLane
from chorus.models import lora
from chorus.models import reward_models
from chorus.models import sharding

GenerationLane = ContinuousLane | DynamicLane


# A learner's pushes move a version forward by its publish interval; after a server restart
# (version 0) a non-resume push may be a whole run's steps ahead, but never this far. Without
# a bound one push of 2**63 - 1 would block every later push of the learner.
MAX_VERSION_JUMP = 1 << 24


class StaleVersionError(ValueError):
  """A parameter update whose version is not newer than the served one."""


class RefusedVersionError(ValueError):
  """A parameter update whose version no learner would send (negative, or far ahead)."""


class FrozenModelError(ValueError):
  """A parameter update to a model that is read-only after set-up (reference, reward model)."""


class WrongModelKindError(ValueError):
  """A call that the model's kind cannot serve (e.g. generating from a reward model)."""


def _shape_and_dtype(array) -> tuple:
  return tuple(array.shape), np.dtype(array.dtype).name


class ServedModel:
  """One named model: its kind, parameters and version, and the batchers that serve it.

  Args:
    name: the name requests use.
    decoder_config: the model's architecture (reward and preference models are decoders
      whose value head is the score).
    params: its parameter tree; later updates must match its tree, shapes and dtypes.
    version: the version of `params`.
    config: batching and timeouts.
    sequence: prompt and completion lengths: prompts are left-padded to
      `sequence.prompt_len` tokens, completions are generated and scored up to
      `sequence.completion_len` tokens.
    kind: 'decoder' (generates, with or without classifier-free guidance, scores
      per-token log-probs, may be either side of a geometric mixture), 'reward' (scores
      one reward per completion) or 'preference' (scores P(completion > comparison) per
      pair).
    pooling: how a reward or preference model reads its value head ('last' or 'mean',
      `models.reward_models.POOLINGS`); decoders ignore it.
    accepts_pushes: whether parameter updates may replace `params` (the policy, a
      published anchor); False freezes the model after set-up (a reference, a learned
      reward or preference model): every push is refused.
    pushed_adapters: when its rank is > 0, pushes carry only LoRA adapters of this config
      (a learner that trains adapters): each is merged into the frozen `params` on
      arrival, so generation runs on plain kernels at the adapter-free cost.
    mesh: the device mesh its parameters are sharded over (models/sharding.py rules; the
      samplers and scorers, jitted, then run sharded); None: the default device.
  """

  def __init__(self, name: str, decoder_config: models.DecoderConfig, params: Any,
               version: int, config: InferenceServerConfig, sequence: core.SequenceSpec,
               kind: str = 'decoder', accepts_pushes: bool = True,
               pooling: str = 'last',
               pushed_adapters: models.LoraConfig = models.LoraConfig(), mesh: Mesh | None = None):
    if kind not in scoring_lib.MODEL_KINDS:
      raise ValueError(f'Model {name!r} has unknown kind {kind!r}; use one of '
                       f'{scoring_lib.MODEL_KINDS}.')
    reward_models.check_pooling(pooling)
    self.name = name
    self.kind = kind
    self.pooling = pooling
    self.accepts_pushes = accepts_pushes
    self.decoder_config = decoder_config
    self.config = config
    self.sequence = sequence
    self._mesh = mesh
    params = self._place(params)
    self._params_and_version = (params, version)
    pushed = params
    self._merge_adapters = None
    if pushed_adapters.rank:
      adapted = dataclasses.replace(decoder_config, lora=pushed_adapters)
      pushed = jax.eval_shape(lambda rng: lora.split(models.init_params(adapted, rng))[1],
                              jax.random.PRNGKey(0))
      # The frozen weights are an argument, not a closure: jit would bake closed-over
      # arrays into the compiled program as constants (a copy of the whole model).
      merge = jax.jit(lambda frozen, adapters: lora.merge(lora.combine(frozen, adapters),
                                                          adapted))
      self._merge_adapters = functools.partial(merge, params)
    self._template = jax.tree_util.tree_map(_shape_and_dtype, pushed)
    self._treedef = jax.tree_util.tree_structure(pushed)
    self.tensor_layout = tuple(
        param_stream.TensorLayout(path, tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in param_stream.tensors(pushed))
    self.push_buffers = param_stream.HostBuffers()
    self._lock = threading.Lock()
    self.counters = dict(requests=0, sequences=0, generated_tokens=0, batches=0, param_updates=0,
                         score_requests=0, scored_sequences=0, score_batches=0,
                         decoded_row_steps=0)
    # Requests without a seed of their own draw their key from this stream.
    self._request_keys = np.random.default_rng(config.seed)
    self._generation = self._make_lane(None) if kind == 'decoder' else None
    self._scoring = ScoringLane(self)
    # Keyed by the second model's name; this model's own name keys its guidance lane.
    self._paired_lanes: dict[str, GenerationLane] = {}

  @property
  def param_version(self) -> int:
    return self._params_and_version[1]

  def params_and_version(self) -> tuple[Any, int]:
    """The current parameters and their version, read together."""
    return self._params_and_version

  def request_key(self, seed: int | None = None) -> tuple[int, int]:
    """A request's PRNG key as two uint32 words: `jax.random.PRNGKey(seed)` for a seed
    in [0, 2**32), else the next key of this model's stream (seeded by config.seed)."""
    if seed is not None:
      if not 0 <= seed < 2**32:
        raise ValueError(f'A request seed must be in [0, 2**32); got {seed}.')
      return (0, seed)
    with self._lock:
      return tuple(int(word) for word in self._request_keys.integers(0, 2**32, 2))

  def warm_up(self, scoring: bool | None = None):
    """Compiles every batch bucket of what this model serves before traffic arrives.

    That is generation (decoders), the mixtures and guidance already added with
    `add_mixture` and `add_guidance`, and scoring when `scoring` is True; None warms
    scoring up for reward and preference models only (a decoder's Score compiles on
    first use). Counters are not touched.
    """
    if self._generation is not None:
      self._generation.warm_up()
    with self._lock:
      lanes = list(self._paired_lanes.values())
    for lane in lanes:
      lane.warm_up()
    if scoring or (scoring is None and self.kind != 'decoder'):
      self._scoring.warm_up()

  def check_generates(self):
    """Raises WrongModelKindError unless this model can generate."""
    if self.kind != 'decoder':
      raise WrongModelKindError(
          f'Model {self.name!r} is a {self.kind} model (kind {self.kind!r}); it scores '
          'completions (Score) but cannot generate. Generate from a decoder model.')

  def add_mixture(self, mixture: 'ServedModel') -> GenerationLane:
    """The lane sampling the geometric mixture of this model and `mixture`; made once.

    Raises:
      WrongModelKindError: either model is not a decoder.
      ValueError: the two models do not share a vocabulary or cannot hold the server's
        prompt and completion lengths.
    """
    self.check_generates()
    if mixture.kind != 'decoder':
      raise WrongModelKindError(
          f'Mixture model {mixture.name!r} is a {mixture.kind} model (kind '
          f'{mixture.kind!r}); a geometric mixture needs two decoder models.')
    if (mixture.config, mixture.sequence) != (self.config, self.sequence):
      raise ValueError(
          f'Models {self.name!r} ({self.config}, {self.sequence}) and {mixture.name!r} '
          f'({mixture.config}, {mixture.sequence}) were served with different configs; serve '
          'both with one InferenceServerConfig and one SequenceSpec to mix them.')
    ours, theirs = self.decoder_config, mixture.decoder_config
    if (ours.vocab_size, ours.max_seq_len) != (theirs.vocab_size, theirs.max_seq_len):
      raise ValueError(
          f'Cannot mix {self.name!r} (vocab_size={ours.vocab_size}, max_seq_len='
          f'{ours.max_seq_len}) with {mixture.name!r} (vocab_size={theirs.vocab_size}, '
          f'max_seq_len={theirs.max_seq_len}): a geometric mixture needs models that share '
          'the vocabulary and max_seq_len.')
    return self._paired_lane(mixture)

  def add_guidance(self) -> GenerationLane:
    """The lane sampling this model with classifier-free guidance; made once.

    Raises:
      WrongModelKindError: this model is not a decoder.
    """
    self.check_generates()
    return self._paired_lane(self)

  def _paired_lane(self, second: 'ServedModel') -> GenerationLane:
    with self._lock:
      lane = self._paired_lanes.get(second.name)
      if lane is None:
        lane = self._paired_lanes[second.name] = self._make_lane(second)
      return lane

  def _make_lane(self, second: 'ServedModel | None') -> GenerationLane:
    lane_class = ContinuousLane if self.config.scheduler == 'continuous' else DynamicLane
    return lane_class(self, second)

  def submit(self, rows: list[Row]) -> concurrent.futures.Future:
    """Queues rows for plain generation; resolves to one RowResult per row."""
    self.check_generates()
    self.count(requests=1)
    return self._generation.submit(rows)

  def submit_mixture(self, mixture: 'ServedModel', rows: list[Row]
                     ) -> concurrent.futures.Future:
    """Queues rows for the geometric mixture with `mixture` (see `add_mixture`)."""
    lane = self.add_mixture(mixture)
    self.count(requests=1)
    return lane.submit(rows)

  def submit_guided(self, rows: list[Row]) -> concurrent.futures.Future:
    """Queues rows for classifier-free guidance (see `add_guidance`): each row's coef
    is 1 - guidance_scale and its second_prompt the unconditional prompt."""
    lane = self.add_guidance()
    self.count(requests=1)
    return lane.submit(rows)

  def submit_score(self, rows: list[ScoreRow]) -> concurrent.futures.Future:
    """Queues rows for scoring; resolves to one ScoreResult per row."""
    self.count(score_requests=1)
    return self._scoring.submit(rows)

  def check_version(self, version: int, resume: bool = False) -> None:
    """Raises unless `version` may replace the served one.

    FrozenModelError: the model takes no pushes. RefusedVersionError: a negative version,
    or one more than MAX_VERSION_JUMP ahead that is not a learner's resume. StaleVersionError:
    not newer than the served version, and not a resume.
    """
    if not self.accepts_pushes:
      raise FrozenModelError(f'Model {self.name!r} is read-only after set-up; it takes no '
                             'parameter pushes.')
    current = self.param_version
    if version < 0:
      raise RefusedVersionError(f'Version {version} is negative; versions count learner '
                                'steps from 0.')
    if not resume and version > current + MAX_VERSION_JUMP:
      raise RefusedVersionError(f'Model {self.name!r} serves version {current}; version '
                                f'{version} is more than {MAX_VERSION_JUMP} ahead, which no '
                                'learner pushes.')
    if version <= current and not resume:
      raise StaleVersionError(f'Model {self.name!r} already serves version {current}; '
                              f'version {version} is not newer. Versions must increase.')

  def unflatten(self, arrays: list) -> Any:
    """A parameter tree of this model's structure from its tensors in `tensor_layout` order."""
    return jax.tree_util.tree_unflatten(self._treedef, arrays)

  def update_params(self, params: Any, version: int, resume: bool = False):
    """Swaps in newer parameters; the batch or decode call running now finishes on the old
    ones, the next one reads these (a continuous lane keeps its rows: see scheduler.py).

    `resume` accepts an older version: a learner restarted from its checkpoint. With
    `pushed_adapters`, `params` are the adapters.
    """
    if jax.tree_util.tree_map(_shape_and_dtype, params) != self._template:
      raise ValueError(f'Parameters for model {self.name!r} do not match its architecture '
                       '(tree, shapes or dtypes); send the parameter tree of the same '
                       'DecoderConfig (only its LoRA adapters when it serves pushed adapters).')
    params = self._place(params) if self._merge_adapters is None else self._place(
        self._merge_adapters(jax.device_put(params)))
    with self._lock:
      self.check_version(version, resume)
      self._params_and_version = (params, version)
      self.counters['param_updates'] += 1

  def _place(self, params):
    return jax.device_put(params) if self._mesh is None else sharding.shard(params, self._mesh)

  def count(self, **increments: int):
    with self._lock:
      for key, increment in increments.items():
        self.counters[key] += increment

  def counters_snapshot(self) -> dict[str, int]:
    """The traffic counters, and `compilations`: XLA compilations of the continuous
    scheduler's lanes so far (constant once they are warmed up)."""
    with self._lock:
      lanes = [self._generation] + list(self._paired_lanes.values())
      return dict(self.counters, compilations=sum(
          lane.compilations for lane in lanes if isinstance(lane, ContinuousLane)))

  def close(self):
    with self._lock:
      lanes = list(self._paired_lanes.values())
    for lane in lanes + [self._generation, self._scoring]:
      if lane is not None:
        lane.close()
