"""GKD on digit reversal: a smaller student learns a bigger teacher on its own samples.

A setup node trains the teacher (4 blocks of width 64) on the task's demonstrations that
earned full reward (`teacher_min_reward=1`: the sloppy annotator's swaps left out, so the
teacher is better than its student); the inference server serves the student (2 blocks
of width 32, warm-started on all the demonstrations, swaps included) and the teacher; the
actors sample the student (on-policy, `agent.on_policy_fraction=1`); the learner minimises the token-level generalized JSD
(beta = 0.5) between the two over the vocabulary. Supervised KD, for comparison:
`--set agent.on_policy_fraction=0 --set agent.beta=0` (forward KL on teacher samples).
"""
import dataclasses

from chorus import agents
from chorus import models
from chorus.configs import text_vtrace
from chorus.launch.experiment import EvalConfig
from chorus.launch.experiment import ExperimentConfig

STUDENT = models.DecoderConfig(vocab_size=models.CharTokenizer().vocab_size, num_layers=2,
                               embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                               mlp_dim=128, max_seq_len=64)


def get_config() -> ExperimentConfig:
  base = text_vtrace.get_config()
  return dataclasses.replace(
      base, name='text_gkd',
      agent=agents.GKDConfig(beta=0.5, on_policy_fraction=1.0, teacher_min_reward=1.0),
      model=models.ModelConfig(decoder=STUDENT),
      learner=dataclasses.replace(base.learner, learning_rate=1e-3, max_steps=300),
      evaluation=EvalConfig(every_s=0.0))
