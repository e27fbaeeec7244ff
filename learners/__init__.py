"""Learners: pure losses, the learner (train state, optimiser, auxiliary trees) and its loop.

Which loss a learner optimises and on what batches is its agent's business (agents/).
"""
from chorus.learners.learner import Learner
from chorus.learners.loop import LearnerConfig
from chorus.learners.loop import run_learner
from chorus.learners.optimization import make_optimizer
from chorus.learners.supervised import token_nll
from chorus.learners.supervised import WarmStartConfig
from chorus.learners.token_mdp import last_token_index
from chorus.learners.token_mdp import token_discounts
from chorus.learners.token_mdp import token_rewards
from chorus.learners.vtrace import vtrace_loss
from chorus.learners.vtrace import vtrace_targets
from chorus.learners.vtrace import VTraceOutput
