"""Shared test set-up: quiet TensorFlow, keep JAX on the CPU, give Ray a private home.

Ray keeps state beside the process in places other Ray users share: its temporary folder
(/tmp/ray, where it records the address of the last cluster started and expects the
folder to exist) and ~/.ray/auth_token (written by the first local instance, then used by
every later cluster on the machine). The suite gives every Ray instance and driver it
starts a folder and a token of its own, set before any test module imports Ray (Ray reads
its authentication settings once per process), so no test needs or leaves such state.
"""
import os
import secrets
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_RAY_ENVIRONMENT = ('RAY_TMPDIR', 'RAY_AUTH_MODE', 'RAY_AUTH_TOKEN', 'RAY_AUTH_TOKEN_PATH',
                    'RAY_ADDRESS')


def _short_private_dir() -> str:
  """A new folder with a path short enough for Ray's socket paths (at most 107 bytes)."""
  base = tempfile.gettempdir()
  return tempfile.mkdtemp(prefix='cr-', dir=base if len(base) <= 40 else '/tmp')


def pytest_configure(config):
  config.chorus_saved_ray_environment = {name: os.environ.get(name) for name in _RAY_ENVIRONMENT}
  ray_dir = _short_private_dir()
  os.makedirs(os.path.join(ray_dir, 'ray'))  # Ray does not create it (ray_current_cluster).
  config.chorus_ray_dir = ray_dir
  os.environ.update(RAY_TMPDIR=ray_dir, RAY_AUTH_MODE='token',
                    RAY_AUTH_TOKEN=secrets.token_hex(32))
  for name in ('RAY_AUTH_TOKEN_PATH', 'RAY_ADDRESS'):
    os.environ.pop(name, None)


def pytest_unconfigure(config):
  if not hasattr(config, 'chorus_ray_dir'):
    return
  shutil.rmtree(config.chorus_ray_dir, ignore_errors=True)
  for name, value in config.chorus_saved_ray_environment.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
