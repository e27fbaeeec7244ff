"""One model on a device mesh: mesh axes (data, fsdp, tensor) and partition rules.

Every accelerator node (learner, inference server) builds a `jax.sharding.Mesh` of its
devices with named axes and places its parameters, optimiser state and batches by
`NamedSharding`; jit then runs the same program sharded (GSPMD), as MaxText and Tunix
do, rather than pmap. The axes:

  data    batches are split over it; parameters are replicated along it;
  fsdp    batches are split over it too, and every large parameter (and the optimiser
          state that mirrors it) is split along its model dimension, so each device holds
          1/fsdp of them (ZeRO-3 / FSDP);
  tensor  attention heads, MLP hidden units and the vocabulary are split over it
          (Megatron-style tensor parallelism); the KV cache is split by head.

Partition rules map parameter paths ('layer_0/attention/query/kernel') to specs by the
first matching regular expression. An axis that does not divide a dimension is left out
for that dimension (a single key/value head, say, stays whole on every tensor shard),
so every model runs on every mesh, sharded as far as its shapes allow.
"""
from collections.abc import Sequence
import dataclasses
import re

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# (path regex, spec by dimension) for the decoder's parameters, first match wins.
DECODER_RULES = (
    (r'embedder/embedding$', P('tensor', 'fsdp')),  # [V, E]
    (r'attention/(query|key|value)/kernel$', P('fsdp', 'tensor', None)),  # [E, H, D]
    (r'attention/out/kernel$', P('tensor', None, 'fsdp')),  # [H, D, E]
    (r'mlp/(gate|up)/kernel$', P('fsdp', 'tensor')),  # [E, F]
    (r'mlp/down/kernel$', P('tensor', 'fsdp')),  # [F, E]
    (r'.*', P()),  # Norm scales, the value head: small, replicated.
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh of an accelerator node (learner or inference server).

  Attributes:
    data: devices along the data axis; 0: every device that fsdp and tensor leave.
    fsdp: devices along the fsdp axis (parameters and optimiser state split over it).
    tensor: devices along the tensor axis (heads, MLP units, vocabulary split over it).
  """
  data: int = 0
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name == 'data' else 1):
        raise ValueError(f'mesh.{name} must be an int >= {0 if name == "data" else 1}; '
                         f'got {value!r}.')

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_devices` devices; ValueError if they do not fit."""
    model_parallel = self.fsdp * self.tensor
    data = self.data or num_devices // model_parallel
    if data < 1 or data * model_parallel != num_devices:
      raise ValueError(
          f'mesh data={self.data or "all"} x fsdp={self.fsdp} x tensor={self.tensor} does '
          f'not use the {num_devices} devices of this node exactly; set mesh.* so that '
          'their product is the device count (mesh.data=0 takes what the others leave).')
    return data, self.fsdp, self.tensor


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `devices` (default: all of this process's view) with MESH_AXES."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices).reshape(config.shape(len(devices))), MESH_AXES)


def _path_text(path) -> str:
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return '/'.join(parts)


def _fitted(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` for an array of `shape`, leaving out axes that do not divide their dimension."""
  if len(spec) > len(shape):
    raise ValueError(f'Partition spec {spec} has more dimensions than an array of shape {shape}.')
  fitted = []
  for dimension, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(name for name in names if dimension % mesh.shape[name] == 0)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*fitted)


def partition_specs(tree, mesh: Mesh, rules=DECODER_RULES):
  """A PartitionSpec per array of `tree` (parameters, or state that mirrors them).

  The rules match the end of each leaf's path, so optimiser states (whose paths hold a
  parameter's path after their own keys) and auxiliary parameter trees get the spec of
  the parameter they mirror. Scalars are replicated.
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def spec_of(path, leaf):
    shape = np.shape(leaf)
    if not shape:
      return P()
    text = _path_text(path)
    spec = next(spec for pattern, spec in compiled if pattern.search(text))
    return _fitted(spec, shape, mesh)

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def named_shardings(tree, mesh: Mesh, rules=DECODER_RULES):
  """`partition_specs` as NamedShardings of `mesh`."""
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                partition_specs(tree, mesh, rules),
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: the leading (batch) dimension split over data and fsdp, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard(tree, mesh: Mesh, rules=DECODER_RULES):
  """`tree` placed on `mesh` by the rules."""
  return jax.device_put(tree, named_shardings(tree, mesh, rules))


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """How many bytes of `tree`'s arrays each device holds (from their shardings)."""
  held = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard_ in leaf.addressable_shards:
      held[shard_.device] = held.get(shard_.device, 0) + shard_.data.nbytes
  return held
