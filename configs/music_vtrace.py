"""V-trace RL on audio-token music: captions in, codec tokens out, rewards from the audio.

A tiny decoder over the music vocabulary (caption words, a null caption, codec codes) is
pretrained on the synthetic caption-audio corpus with condition dropout (the warm start),
then fine-tuned on caption adherence and quality measured from the decoded waveform.
The run directory also holds WAV samples of fixed captions before and after training.
"""
from chorus import core
from chorus import models
from chorus.actors import music
from chorus.inference_server.config import InferenceServerConfig
from chorus.launch.experiment import EvalConfig
from chorus.launch.experiment import ExperimentConfig
from chorus.learners.loop import LearnerConfig
from chorus.learners.supervised import WarmStartConfig
from chorus.replay.config import ReplayConfig


def get_config() -> ExperimentConfig:
  # 16 samples of each held-out caption: enough generation to time tokens/s too.
  task_config = music.MusicTaskConfig(eval_samples_per_caption=16)
  return ExperimentConfig(
      name='music_vtrace',
      task=task_config,
      model=models.ModelConfig(
          decoder=models.DecoderConfig.tiny(music.MusicTask(task_config).vocab_size)),
      # Short on purpose: the pretrained model leaves room for RL to raise adherence (and
      # for guidance to help, which it barely does after 150 steps).
      warm_start=WarmStartConfig(steps=60, batch_size=64, learning_rate=3e-3),
      sequence=core.SequenceSpec(prompt_len=8, completion_len=task_config.num_frames + 1),
      inference=InferenceServerConfig(max_batch_size=32, max_wait_ms=5.0),
      replay=ReplayConfig(kind='queue', max_size=64),
      learner=LearnerConfig(batch_size=32, learning_rate=5e-4, max_steps=600),
      evaluation=EvalConfig(every_s=10.0))
