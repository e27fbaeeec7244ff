"""Launching: experiment configs, program graphs and launchers."""
from chorus.launch.experiment import ExperimentConfig
from chorus.launch.program import Address
from chorus.launch.program import make_program
from chorus.launch.program import Node
