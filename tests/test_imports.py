"""The package's import graph: no cycles, and roles that load only what they use."""
import ast
import importlib.util
import os
import subprocess
import sys

import chorus

_ROOT = os.path.dirname(chorus.__file__)
_SKIPPED = ('tests', 'benchmarks', '.venv', 'build')


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, _ROOT)[:-len('.py')].split(os.sep)
  if relative[-1] == '__init__':
    relative = relative[:-1]
  return '.'.join(['chorus', *relative])


def _modules() -> dict[str, str]:
  """Every module of the package (not tests or benchmarks): name -> path."""
  modules = {}
  for directory, subdirectories, files in os.walk(_ROOT):
    subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED and not d.startswith('.')]
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        modules[_module_name(path)] = path
  return modules


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules a file imports explicitly (module level or inside functions)."""
  imported = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from chorus.x import y`: y is a module of the package, or a name in chorus.x.
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
               else node.module for alias in node.names]
    else:
      continue
    imported.update(name for name in names if name in modules)
  return imported


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph[node]:
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1 or node in graph[node]:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_no_module_of_the_package_imports_itself_through_others():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  assert len(graph) > 50  # The walk found the package.
  assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def _loaded_by(module: str) -> set[str]:
  code = (f'import sys, {module}; '
          'print("\\n".join(m for m in sys.modules if m.startswith(("chorus", "jax", "reverb"))))')
  output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout
  return set(output.split())


def test_the_inference_client_loads_neither_the_server_nor_jax():
  loaded = _loaded_by('chorus.inference_server.client')
  assert not {'chorus.inference_server.service', 'chorus.inference_server.served_model',
              'chorus.inference_server.lanes', 'chorus.inference_server.sampler'} & loaded
  assert 'jax' not in loaded and 'reverb' not in loaded


_TENSORFLOW = ('tensorflow', 'reverb', 'tensorflow_datasets', 'rlds')


def test_a_node_that_only_loads_a_config_imports_no_tensorflow():
  # What the worker of every node runs before its role, and what the evaluator and the
  # inference server add: TensorFlow's import costs each of them about 3 CPU-seconds.
  code = ('import sys\n'
          'from chorus import configs\n'
          'from chorus.launch import experiment, nodes\n'
          'for name in configs.CONFIG_NAMES:\n'
          '  config = experiment.load_experiment(experiment.to_dict(configs.get_config(name)))\n'
          '  config.make_task()\n'
          '  config.builder().served_models(config.model.base_decoder_config())\n'
          f'print(sorted(m for m in sys.modules if m.split(".")[0] in {_TENSORFLOW!r}))\n')
  output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout
  assert output.strip() == '[]'


def test_the_lazy_packages_still_export_their_names():
  from chorus import datasets, replay  # pylint: disable=g-import-not-at-top
  from chorus.datasets import rlds_writer  # pylint: disable=g-import-not-at-top
  from chorus.replay import tables  # pylint: disable=g-import-not-at-top
  assert datasets.EpisodeLogger is rlds_writer.EpisodeLogger
  assert replay.serve is tables.serve
  for package in (datasets, replay):
    assert all(getattr(package, name) is not None for name in package.__all__)
  try:
    datasets.EpisodeLoger  # pylint: disable=pointless-statement
  except AttributeError as error:
    assert 'EpisodeLoger' in str(error)
  else:
    raise AssertionError('a misspelt name must raise AttributeError')


def test_the_worker_loads_tensorflow_before_start_up_ends_only_for_roles_that_use_it():
  from chorus.launch import nodes  # pylint: disable=g-import-not-at-top
  assert set(nodes.SLOW_IMPORTS) <= set(nodes.ENTRY_POINTS)
  assert not {'evaluator', 'inference_server'} & set(nodes.SLOW_IMPORTS)
  for modules in nodes.SLOW_IMPORTS.values():
    assert all(importlib.util.find_spec(module) for module in modules), modules
