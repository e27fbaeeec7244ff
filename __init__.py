"""Chorus: SEED RL-style actor-learner RL for token models."""
