"""Diversity-rewarded distillation of the classifier-free-guided music model into itself.

The teacher is the pretrained model with CFG (two passes per token); the student starts
from the same weights and is sampled without CFG (one pass). Each caption gets two
samples whose diversity 1 - cos(E(x1), E(x2)) rewards both. The summary compares the
student's reward, diversity and tokens/s with the CFG teacher's; set
`agent.diversity_coef=0` for the plain distilled (quality-only) model.
"""
import dataclasses

from chorus import agents
from chorus.configs import music_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.loop import LearnerConfig


def get_config() -> ExperimentConfig:
  base = music_vtrace.get_config()
  return dataclasses.replace(
      base, name='music_cfg_distill',
      agent=agents.CFGDistillConfig(guidance_scale=3.0, diversity_coef=0.5),
      evaluation=dataclasses.replace(base.evaluation, cfg_teacher_guidance_scale=3.0),
      learner=LearnerConfig(batch_size=32, learning_rate=5e-4, max_steps=400))
