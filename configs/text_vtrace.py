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
from chorus.replay.config import ReplayConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      name='text_vtrace',
      agent=agents.VTraceConfig(),
      # Prompts padded to what the task needs ("rev 1234567>" is BOS + 12 tokens): every
      # padded position costs the learner and the server compute. Completions keep room
      # past the longest answer (7 digits and EOS). A cap of 8 learns as well now that
      # the cap ends the episode (seeds 0-2: 0.971-0.987; when it bootstrapped, seed 1
      # ran into it, 0.83 -> 0.31) but saved little: 3.7-3.9 CPU-ms per episode against
      # 3.9 (benchmarks/RESULTS.md).
      sequence=core.SequenceSpec(prompt_len=13, completion_len=12),
      inference=InferenceServerConfig(max_batch_size=32, max_wait_ms=5.0),
      # Policy lag is what the pipeline holds once the learner is the bottleneck (cheap
      # actors make it so): this queue, the batch read ahead, a quarter batch in flight
      # from Reverb and the actors' requests, about 3 updates. Lag spikes of 6-8 updates
      # (a 64-row queue read 4 batches ahead, under load) collapsed seed 1 at Adam 2e-4.
      # Adam 3e-4 decaying to 0: seeds 0-2 reached 0.95 in 37-39 CPU-s (read at 10-s
      # evaluations, 2026-11-30) and ended at 0.974-0.982; 2e-4 took 44-56 and 4e-4 was no
      # faster; a 30-update warm-up (2026-12-01) no faster either. At a constant rate one seed
      # drifted late (0.97 -> 0.89), hence the decay. Most runs that fell before
      # 2026-11-30 (9 of 12 on record) had learned to run into the completion cap, which
      # then bootstrapped (docs/algorithms.md, "How a row ends"; benchmarks/RESULTS.md).
      replay=ReplayConfig(kind='queue', max_size=32),
      learner=LearnerConfig(batch_size=32, learning_rate=3e-4, learning_rate_decay=True,
                            max_steps=600),
      # Every 2 s: RL takes about 35 s here, and time to reward is read at evaluations.
      evaluation=EvalConfig(every_s=2.0),
      # Actor loops are threads of one process: one TensorFlow start-up (about 4 CPU-s)
      # instead of four, and they mostly wait on the server.
      num_actors=4, actors_per_process=4)
