"""Experiments: command-line programs that read configs and call geco_jax."""
