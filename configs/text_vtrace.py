"""V-trace RL on digit reversal, after a warm start on a sloppy annotator's demonstrations.

The default `make run` experiment: a tiny Gemma-style decoder, 4 actors, one inference
server, a Reverb queue and one learner, sized to finish in minutes on 2 CPU cores.
"""
from chorus import agents
from chorus import core
from chorus.inference_server.config import InferenceServerConfig
from chorus.launch.experiment import EvalConfig
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.loop import LearnerConfig
from chorus.replay.tables import ReplayConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      name='text_vtrace',
      agent=agents.VTraceConfig(),
      sequence=core.SequenceSpec(prompt_len=16, completion_len=12),
      inference=InferenceServerConfig(max_batch_size=32, max_wait_ms=5.0),
      # A short queue bounds policy lag to a few updates; with a larger one or a larger
      # learning rate, lag spikes (a slow checkpoint, say) destabilised 1 seed in 4.
      replay=ReplayConfig(kind='queue', max_size=64),
      learner=LearnerConfig(batch_size=32, learning_rate=2e-4, max_steps=600),
      evaluation=EvalConfig(every_s=10.0))
