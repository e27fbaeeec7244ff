"""How launchers supervise nodes and what the Ray launcher asks Ray for (`--set launcher.*`)."""
import dataclasses

from chorus import core


@dataclasses.dataclass(frozen=True)
class LauncherConfig:
  """How a launcher supervises nodes; the ray_* fields matter only with `--launcher ray`.

  Attributes:
    max_restarts: restarts allowed per restartable node before the run fails.
    restart_backoff_s: first restart delay; doubles with each restart of that node.
    stop_timeout_s: grace period after SIGTERM before SIGKILL.
    ray_accelerator_resources: what each accelerator node (inference servers, learner,
      reward-model training) asks Ray for, e.g. {"GPU": 1}, {"GPU": 0.5} or
      {"accelerator": 1}; empty: {"GPU": 1} where the Ray cluster has a GPU, else
      {"CPU": 1}.
    ray_cpu_resources: what every other node asks Ray for; empty: {"CPU": 1}, one
      placement slot (a slot, not a core: Ray runs no more nodes on a machine than its
      logical CPUs).
    ray_local_num_cpus: logical CPUs of the Ray instance the launcher starts on this
      machine when given no cluster address; 0: the machine's cores or the number of
      nodes the program runs at once, whichever is larger, so every node gets a slot.
    ray_placement_timeout_s: how long Ray may take to place a node (an autoscaling cluster
      may first have to start a machine) before the run fails.
  """
  max_restarts: int = 3
  restart_backoff_s: float = 1.0
  stop_timeout_s: float = 30.0
  ray_accelerator_resources: dict[str, float] = dataclasses.field(default_factory=dict)
  ray_cpu_resources: dict[str, float] = dataclasses.field(default_factory=dict)
  ray_local_num_cpus: int = 0
  ray_placement_timeout_s: float = 600.0

  def __post_init__(self):
    core.check_ranges(self, 'launcher', max_restarts=(0, None), restart_backoff_s=(0, None),
                      stop_timeout_s=(0, None), ray_local_num_cpus=(0, None),
                      ray_placement_timeout_s=(0, None))
