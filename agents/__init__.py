"""Agents: one module per algorithm, each a builder (see builder.py) registered by its tag.

    from chorus import agents
    builder = agents.make_builder(agents.VTraceConfig(kl_coef=0.05))

A new algorithm is one module defining an AgentConfig dataclass with a tag and a
builder decorated with `agents.register`; an experiment names it by its config.
"""
from chorus.agents.bond import BondConfig
from chorus.agents.builder import AgentBuilder
from chorus.agents.builder import AgentConfig
from chorus.agents.builder import Data
from chorus.agents.builder import DataSource
from chorus.agents.builder import LearnerContext
from chorus.agents.builder import make_builder
from chorus.agents.builder import POLICY_MODEL
from chorus.agents.builder import REFERENCE_MODEL
from chorus.agents.builder import register
from chorus.agents.builder import ServedModelSpec
from chorus.agents.builder import SetupContext
from chorus.agents.builder import SetupStep
from chorus.agents.builder import tags
from chorus.agents.cfg_distill import CFGDistillConfig
from chorus.agents.gkd import GKDConfig
from chorus.agents.grpo import GRPOConfig
from chorus.agents.inverse_soft_q import InverseSoftQConfig
from chorus.agents.nash_md import NashMDConfig
from chorus.agents.oaif import OAIFConfig
from chorus.agents.ppo import PPOConfig
from chorus.agents.soft_q import SoftQConfig
from chorus.agents.vtrace import VTraceConfig
from chorus.agents.warp import WarpConfig
