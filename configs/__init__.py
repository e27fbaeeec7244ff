"""One module per experiment; each has get_config() -> ExperimentConfig."""
import importlib

CONFIG_NAMES = ('text_vtrace',)


def get_config(name: str):
  if name not in CONFIG_NAMES:
    raise ValueError(f'Unknown config {name!r}; available: {", ".join(CONFIG_NAMES)}.')
  return importlib.import_module(f'chorus.configs.{name}').get_config()
