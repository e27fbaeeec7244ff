"""One module per experiment; each has get_config() -> ExperimentConfig."""
import importlib

CONFIG_NAMES = ('text_vtrace', 'text_soft_q', 'text_irl', 'text_bond', 'text_nash_md',
                'music_vtrace', 'music_cfg_distill')


def get_config(name: str):
  if name not in CONFIG_NAMES:
    raise ValueError(f'Unknown config {name!r}; available: {", ".join(CONFIG_NAMES)}.')
  return importlib.import_module(f'chorus.configs.{name}').get_config()
