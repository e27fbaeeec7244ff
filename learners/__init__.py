"""Learners: pure losses and the loop that applies them."""
from chorus.learners.learner import Learner
from chorus.learners.learner import make_optimizer
from chorus.learners.loop import LearnerConfig
from chorus.learners.loop import run_learner
from chorus.learners.supervised import token_nll
from chorus.learners.supervised import WarmStartConfig
from chorus.learners.token_mdp import last_token_index
from chorus.learners.token_mdp import token_discounts
from chorus.learners.token_mdp import token_rewards
from chorus.learners.vtrace import vtrace_loss
from chorus.learners.vtrace import vtrace_targets
from chorus.learners.vtrace import VTraceOutput
from chorus.learners.vtrace_learner import VTraceConfig
from chorus.learners.vtrace_learner import make_vtrace_learner
