"""Diversity-rewarded distillation of the classifier-free-guided music model into itself.

The teacher is the pretrained model with CFG (two passes per token); the student starts
from the same weights and is sampled without CFG (one pass). Each caption gets two
samples whose diversity 1 - cos(E(x1), E(x2)) rewards both. The summary compares the
student's reward, diversity and tokens/s with the CFG teacher's; set
`cfg_distill.diversity_coef=0` for the plain distilled (quality-only) model.
"""
import dataclasses

from chorus.configs import music_vtrace
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.cfg_distill_learner import CFGDistillConfig
from chorus.learners.loop import LearnerConfig


def get_config() -> ExperimentConfig:
  base = music_vtrace.get_config()
  return dataclasses.replace(
      base, name='music_cfg_distill', algorithm='cfg_distill',
      cfg_distill=CFGDistillConfig(guidance_scale=3.0, diversity_coef=0.5),
      learner=LearnerConfig(batch_size=32, learning_rate=5e-4, max_steps=400))
