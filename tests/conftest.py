"""Shared test set-up: quiet TensorFlow and keep JAX on the CPU."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
