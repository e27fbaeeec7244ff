"""The run directory's layout, in one place (README.md documents it for users)."""
import os


def metrics_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'metrics.jsonl')


def warm_start_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'warm_start')


def learner_checkpoint_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'checkpoints', 'learner')


def replay_checkpoint_dir(run_dir: str, node: str) -> str:
  """Reverb's checkpoints of replay node `node`'s tables (it keeps the newest only)."""
  return os.path.join(run_dir, 'checkpoints', node)


def rlds_dir(run_dir: str, actor_id: int | None = None) -> str:
  base = os.path.join(run_dir, 'rlds')
  return base if actor_id is None else os.path.join(base, f'actor_{actor_id:03d}')


def tensorboard_dir(run_dir: str) -> str:
  return os.path.join(run_dir, 'tensorboard')


def config_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'config.json')


def summary_path(run_dir: str) -> str:
  return os.path.join(run_dir, 'summary.json')


def setup_done_path(run_dir: str, node: str) -> str:
  """Written when setup node `node` finished: a resumed run does not run it again."""
  return os.path.join(run_dir, 'nodes', f'{node}.done')


def check_run_dir(run_dir: str, resume: bool) -> None:
  """A new run needs a directory without a run in it; a resumed one, the run's directory.

  Raises:
    ValueError: a new run in a directory that holds one (its checkpoints would be mixed
      with the new run's), or FileNotFoundError: `resume` of a directory without a run.
  """
  has_run = os.path.exists(config_path(run_dir))
  if resume and not has_run:
    raise FileNotFoundError(f'{os.path.abspath(run_dir)} holds no run to resume (no '
                            'config.json); give the run directory of an earlier `chorus run`.')
  if not resume and has_run:
    raise ValueError(f'{os.path.abspath(run_dir)} already holds a run; continue it with '
                     f'`chorus run --resume {run_dir}` or give another --run-dir.')
