"""Launching: experiment configs (experiment.py), program graphs (program.py), the local and
Ray launchers and the `chorus` CLI.

Nothing is imported here: `python -m chorus.launch.worker` must install its signal handlers
before TensorFlow and JAX load, so that a node stopped during start-up still exits cleanly.
"""
