"""Package attributes loaded from their modules on first use (PEP 562).

The RLDS and Reverb modules import TensorFlow (about 3 CPU-seconds per process). A
package that re-exports them lazily lets a process that only loads a config, such as the
evaluator or the inference server, leave TensorFlow out.
"""
from collections.abc import Callable, Mapping
import importlib
from typing import Any


def exports(package: str, module_of: Mapping[str, str]) -> Callable[[str], Any]:
  """The `__getattr__` of `package`: `name` comes from `package.<module_of[name]>`."""

  def get(name: str) -> Any:
    if name not in module_of:
      raise AttributeError(f'module {package!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{package}.{module_of[name]}'), name)

  return get
