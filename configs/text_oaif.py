"""Online AI feedback on digit reversal: DPO on pairs the current policy samples, judged online.

Actors sample two completions per prompt from the policy and the task's noisy annotator
(the reward seen through sigmoid label noise, temperature 0.1) labels each pair; the
learner takes DPO steps against the frozen warm start. Offline DPO is the same config on
a recorded dataset of labelled pairs: `--replay-dataset DIR`, e.g. the rlds/ folder of a
run with `--set learner.learning_rate=0`, whose pairs all come from the reference.
`--set agent.loss=ipo` trains IPO; `--set agent.preference_model.kind=learned` judges
with a served pairwise preference model.
"""
import dataclasses

from chorus import agents
from chorus.configs import text_vtrace
from chorus.launch.experiment import ExperimentConfig


def get_config() -> ExperimentConfig:
  return dataclasses.replace(text_vtrace.get_config(), name='text_oaif',
                             agent=agents.OAIFConfig())
