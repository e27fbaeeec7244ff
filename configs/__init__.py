"""One module per experiment; each has get_config() -> ExperimentConfig and a docstring whose
first line describes it (`chorus configs` lists them)."""
import ast
import importlib
import os

CONFIG_NAMES = ('text_vtrace', 'text_soft_q', 'text_irl', 'text_bond', 'text_nash_md',
                'text_grpo', 'text_ppo', 'text_oaif', 'text_warp', 'text_gkd', 'music_vtrace',
                'music_cfg_distill')


def _module(name: str):
  if name not in CONFIG_NAMES:
    raise ValueError(f'Unknown config {name!r}; available: {", ".join(CONFIG_NAMES)}.')
  return importlib.import_module(f'chorus.configs.{name}')


def get_config(name: str):
  return _module(name).get_config()


def description(name: str) -> str:
  """The first line of the config module's docstring, read without importing it (fast)."""
  if name not in CONFIG_NAMES:
    raise ValueError(f'Unknown config {name!r}; available: {", ".join(CONFIG_NAMES)}.')
  with open(os.path.join(os.path.dirname(__file__), f'{name}.py'), encoding='utf-8') as file:
    docstring = ast.get_docstring(ast.parse(file.read())) or ''
  return (docstring.strip().splitlines() or [''])[0]
