"""Test set-up: eight host CPU devices, so data-parallel code is tested without accelerators."""

import os

# Must happen before JAX initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
