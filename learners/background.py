"""Off the learner's critical path: pushing parameters (the next batch is read ahead by
chorus.prefetch.Prefetcher).

`BackgroundPublisher` pushes the newest parameters to every inference server from one
thread per server: a version due while a push to that server is in flight waits in a
slot of one, and a newer version replaces it there (newest wins; versions are never
queued), so a slow server costs the learner nothing and receives fewer versions. The
publisher knows nothing of the transport: it is given one `push(models, version)` per
server.
"""
from collections.abc import Callable, Mapping
import threading
from typing import Any

PushFn = Callable[[dict[str, Any], int], None]


class _Lane:
  """One server's pushes: a thread and a slot of one for the version waiting to go."""

  def __init__(self, name: str, push: PushFn):
    self.name = name
    self._push = push
    self._condition = threading.Condition()
    self._waiting: tuple[dict[str, Any], int] | None = None
    self._in_flight = False
    self._closed = False
    self.pushed_version: int | None = None
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name=f'publish_{name}', daemon=True)
    self._thread.start()

  def offer(self, models: dict[str, Any], version: int):
    with self._condition:
      self._waiting = (models, version)  # Replaces a version still waiting: newest wins.
      self._condition.notify_all()

  def _run(self):
    while True:
      with self._condition:
        while self._waiting is None and not self._closed:
          self._condition.wait()
        if self._waiting is None:
          return
        (models, version), self._waiting = self._waiting, None
        self._in_flight = True
      try:
        self._push(models, version)
      except BaseException as error:  # pylint: disable=broad-except
        with self._condition:
          self.error = error
      with self._condition:
        self._in_flight = False
        if self.error is None:
          self.pushed_version = version
        self._condition.notify_all()

  def wait_idle(self, timeout_s: float) -> bool:
    with self._condition:
      return self._condition.wait_for(
          lambda: self.error is not None or (self._waiting is None and not self._in_flight),
          timeout=timeout_s)

  def close(self):
    with self._condition:
      self._closed = True
      self._condition.notify_all()
    self._thread.join()


class PublishError(RuntimeError):
  """A background push failed; the learner stops (and restarts from its checkpoint)."""


class BackgroundPublisher:
  """Pushes the newest submitted parameters to every server, concurrently, in the background.

  Args:
    pushes: per server (any name, e.g. its address), `push(models, version)`: sends
      every model of `models` (served name -> parameters) as `version`, raising on failure.
      Parameters must not change after `submit` (JAX arrays never do).
  """

  def __init__(self, pushes: Mapping[str, PushFn]):
    self._lanes = [_Lane(name, push) for name, push in pushes.items()]

  def _raise_if_failed(self):
    for lane in self._lanes:
      if lane.error is not None:
        raise PublishError(f'Publishing to {lane.name} failed: {lane.error}') from lane.error

  def submit(self, models: dict[str, Any], version: int) -> None:
    """Schedules `version` on every server; returns at once (raises an earlier push's error)."""
    self._raise_if_failed()
    for lane in self._lanes:
      lane.offer(models, version)

  def pushed_versions(self) -> dict[str, int | None]:
    """The last version each server has received (None before the first)."""
    return {lane.name: lane.pushed_version for lane in self._lanes}

  def flush(self, timeout_s: float = 120.0) -> None:
    """Waits until every server has the last submitted version; raises a push's error."""
    for lane in self._lanes:
      if not lane.wait_idle(timeout_s):
        raise PublishError(f'Publishing to {lane.name} did not finish within {timeout_s} s.')
    self._raise_if_failed()

  def close(self) -> None:
    """Stops the threads once their waiting versions are pushed (flush first to wait)."""
    for lane in self._lanes:
      lane.close()
