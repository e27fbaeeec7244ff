"""The run directory's layout, in one place (README.md documents it for users)."""
import os


def metrics_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'metrics.jsonl')


def warm_start_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'warm_start')


def learner_checkpoint_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'learner')


def rlds_dir(run_dir: str, actor_id: int | None = None) -> str:
  base = os.path.join(run_dir, 'rlds')
  return base if actor_id is None else os.path.join(base, f'actor_{actor_id:03d}')


def tensorboard_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'tensorboard')


def config_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'config.json')


def summary_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'summary.json')
