"""Replay: Reverb tables, the actors' TrajectoryWriter and the learner's batch_iterator."""
from chorus.replay.dataset import batch_iterator
from chorus.replay.tables import make_tables
from chorus.replay.tables import ReplayConfig
from chorus.replay.writer import TrajectoryWriter
