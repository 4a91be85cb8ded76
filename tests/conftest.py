"""Test set-up: eight host CPU devices, so data-parallel code is tested without
accelerators, and one compilation cache for the whole test session.

Many tests train the same tiny models (the same programs, in this process and
in the subprocesses of the command-line tests); JAX's persistent compilation
cache lets each program compile once per session. The cache lives in a fresh
temporary directory, removed at the end, so no session reads another's entries
(a cache directory already set in the environment is kept and left as it is).
Measured: tests/test_train.py 223 s without, 137 s with (2-core CPU).

Under pytest-xdist (the default, ``-n auto`` in pyproject.toml) this file is
imported by the controlling process first, and the worker processes it starts
inherit its environment, so they all share the controller's cache directory,
which the controller removes at the end.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="geco_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  # Cache every program, however small or quick to compile (subprocesses
  # inherit these through the environment).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
