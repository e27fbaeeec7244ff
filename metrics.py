"""Structured metrics: every process appends JSON lines to the run's metrics.jsonl."""
import json
import os
import time

import numpy as np


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item() if np.ndim(value) == 0 else value.tolist()
  if hasattr(value, 'item') and callable(value.item):  # jax scalars
    return value.item()
  return value


class MetricsWriter:
  """Appends {"node", "time", ...values} lines to one file shared by all nodes.

  Each line goes out in one O_APPEND write, so lines of concurrent processes never mix.
  """

  def __init__(self, path: str | os.PathLike, node: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self.node = node

  def write(self, **values):
    record = {'node': self.node, 'time': time.time()}
    record.update({key: _plain(value) for key, value in values.items()})
    os.write(self._fd, (json.dumps(record) + '\n').encode())

  def write_history(self, history: list[dict], count: int = 20, **values):
    """About `count` evenly spaced records of a training history and its last one, each
    with `values` added (a training run's curve, without a line per step)."""
    for record in history[::max(1, len(history) // count)] + history[-1:]:
      self.write(**values, **record)

  def close(self):
    os.close(self._fd)


def read_metrics(path: str | os.PathLike, node: str | None = None) -> list[dict]:
  """The records of `path`, optionally of one node; a half-written last line is skipped."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as file:
    for line in file:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if node is None or record.get('node') == node:
        records.append(record)
  return records
