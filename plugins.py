"""Users' code by name: plugin modules, .py files and `MODULE:ATTRIBUTE` references.

An experiment's `plugins` are imported in every process before its config is read, so
agents and tasks they define (and register, by defining their config classes) are known
everywhere; the same loader reads `--task MODULE:CLASS`-style references.
"""
import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any


def import_module(name: str) -> ModuleType:
  """Imports a module by dotted name, or a .py file by path (once per path).

  Raises:
    ImportError: naming what could not be imported and why.
  """
  if name.endswith('.py') or os.sep in name:
    path = os.path.abspath(name)
    if not os.path.isfile(path):
      raise ImportError(f'Plugin file {path} does not exist.')
    module_name = f'chorus_plugin_{hashlib.sha256(path.encode()).hexdigest()[:12]}'
    if module_name in sys.modules:
      return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Before running it: dataclasses look it up.
    try:
      spec.loader.exec_module(module)
    except Exception:
      del sys.modules[module_name]
      raise
    return module
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as error:
    raise ImportError(f'Cannot import module {name!r} ({error}); give an importable module '
                      'name or a path to a .py file.') from error


def import_object(reference: str) -> Any:
  """The attribute named by 'MODULE:ATTRIBUTE' (MODULE a module name or a .py path)."""
  module_name, separator, attribute = reference.rpartition(':')
  if not separator or not module_name or not attribute:
    raise ValueError(f'{reference!r} is not MODULE:NAME, e.g. my_rewards:score or '
                     'path/to/rewards.py:score.')
  module = import_module(module_name)
  try:
    return getattr(module, attribute)
  except AttributeError:
    raise ImportError(f'{module_name} has no attribute {attribute!r}.') from None


def import_plugins(names) -> None:
  """Imports every plugin module or file in `names`."""
  for name in names:
    import_module(name)
