"""What every experiment's command line shares: the flags, one-line errors, quiet logs,
and what a signal does.

``--config`` (an ml_collections config file, locked, with ``--config.x=y``
overrides) and ``--workdir`` are defined here once, so experiments can be
imported together. A bad flag, a config that does not load or a value that
makes no sense ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only writes summaries here; without this, importing it prints a
# note about oneDNN on every run (tensorflow-cpu 2.21), whatever the log level.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints.")
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)


def require(*names: str) -> None:
  """Mark the flags an entry point needs (call at import, before ``app.run``)."""
  flags.mark_flags_as_required(list(names))


USAGE_ERROR = 2


def fail(message: str, *, abandon_threads: bool = False) -> None:
  """One line on stderr, exit status 2.

  ``abandon_threads``: exit at once (``os._exit``), for failures inside
  libraries whose background threads (orbax's, TensorStore's) would otherwise
  print tracebacks of their own while the interpreter shuts down.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  if abandon_threads:
    sys.stdout.flush()
    os._exit(USAGE_ERROR)  # pylint: disable=protected-access
  sys.exit(USAGE_ERROR)


_QUOTES = "\"' "


def _missing_field(error: Exception) -> str:
  """"it has no field 'x'" (+ ConfigDict's "Did you mean ..."), from its nested KeyError."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  name, _, hint = text.partition("\n")
  message = f"it has no field {name.strip(_QUOTES)!r}"
  return f"{message}; {hint.strip()}" if hint.strip() else message


def parse_flags(argv):
  """Parse flags; a bad flag or config is one line and exit status 2, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
      # config_flags embeds the traceback of a failing get_config(): keep its
      # first line and the exception it ends with.
      fail(f"{lines[0]} {lines[-1].strip()}")
    fail(lines[0] if lines else type(e).__name__)
  except (AttributeError, KeyError) as e:   # an override of a field that does not exist
    fail(f"could not load the config: {_missing_field(e)} ({type(e).__name__}): a "
         "--config.<field>=... override, or the config file itself, names a field that "
         "does not exist.")
  except Exception as e:  # pylint: disable=broad-except
    # Raised while loading a broken config module (its get_config included).
    fail(f"could not load the config: {type(e).__name__}: {' '.join(str(e).split())}")


def config_or_fail() -> ml_collections.ConfigDict:
  """The parsed ``--config``, or one line and exit status 2 if it did not load."""
  config = CONFIG.value
  if isinstance(config, ml_collections.ConfigDict):
    return config
  # config_flags defers a load failure (missing file, broken module) to the
  # first use of the config; report it now, in one line.
  try:
    config.seed  # pylint: disable=pointless-statement
    reason = ""
  except OSError as e:
    reason = " ".join(str(e.__cause__ or e).split())
  except Exception:  # pylint: disable=broad-except
    reason = ""
  reason = reason or f"get_config() returned {type(config).__name__}, not a ConfigDict"
  fail(f"could not load --config={FLAGS['config'].serialize().split('=', 1)[-1]}: "
       f"{reason}")


def quiet_library_logs() -> None:
  """Drop the INFO chatter of orbax (a dozen lines per checkpoint); keep warnings."""

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  logging.get_absl_handler().python_handler.addFilter(keep)


def apply_xla_flags(config: ml_collections.ConfigDict) -> None:
  """Puts ``config.xla_flags`` in ``$XLA_FLAGS``, which XLA reads when JAX starts.

  The config's flags come first, so a flag also set in the environment keeps
  the environment's value. Called before any JAX computation; if JAX's
  backends are already running, the flags cannot take effect and that is
  logged as a warning.
  """
  wanted = config.get("xla_flags", "").split()
  current = os.environ.get("XLA_FLAGS", "").split()
  if not wanted or all(flag in current for flag in wanted):
    return
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  if xla_bridge.backends_are_initialized():
    logging.warning("config.xla_flags %r not applied: JAX has already started.",
                    config.xla_flags)
    return
  os.environ["XLA_FLAGS"] = " ".join(wanted + current)


class Interrupted(Exception):
  """A program stopped by SIGTERM / SIGINT at a point where it saved what it had.

  ``signum``: the signal (the exit status is 128 + it), or None if not known.
  """

  def __init__(self, message: str, signum: Optional[int] = None):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_status(self) -> int:
    return 128 + (self.signum if self.signum is not None else signal.SIGINT)


def signal_name(signum: Optional[int]) -> str:
  return signal.Signals(signum).name if signum is not None else "a signal"


class StopRequest:
  """SIGTERM / SIGINT set a flag that a long program reads at safe points.

  Python's own SIGINT handler raises ``KeyboardInterrupt`` wherever the main
  thread happens to be; raised inside a garbage-collection callback (JAX
  registers one) it is printed and ignored, and the program goes on as if
  nothing had come. Entered for the whole of a program (``run(main,
  stop=StopRequest())``), a signal is never lost: one that comes while the
  program loads its config, its data or its model is seen at the next check
  (``raise_if_requested``), and the training loop saves the step it is on and stops. A
  second signal raises ``KeyboardInterrupt``: stop at once. Only the main
  thread can install handlers; elsewhere this does nothing.
  """

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous: dict = {}

  def raise_if_requested(self, when: str) -> None:
    """``Interrupted`` ("stopped by SIGINT <when>") if a signal has come."""
    if self.signal is not None:
      raise Interrupted(f"stopped by {signal_name(self.signal)} {when}", self.signal)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("Received %s: stopping at the next safe point (a training run "
                    "saves the step it is on).", signal.Signals(signum).name)

  def __exit__(self, *exc_info):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _exit_now(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access  (orbax's threads would print)


def run(main: Callable, *, stop: Optional[StopRequest] = None) -> None:
  """``absl.app.run(main)`` with this module's flag parsing, and signals in one line.

  With ``stop``, its handlers are installed before the flags (and the config
  file) are parsed, so that no SIGTERM / SIGINT is lost; ``main`` reads it.
  ``Interrupted`` from ``main`` is one line on stderr and exit status 128 +
  the signal; ``KeyboardInterrupt`` (Ctrl-C without ``stop``, or a second
  signal with it) one line and exit status 130, without a traceback.
  """

  def guarded(argv):
    try:
      main(argv)
    except Interrupted as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
      sys.exit(e.exit_status)

  try:
    if stop is None:
      app.run(guarded, flags_parser=parse_flags)
    else:
      with stop:
        app.run(guarded, flags_parser=parse_flags)
  except KeyboardInterrupt:
    if stop is None:
      _exit_now("interrupted (SIGINT); what was written before is kept.", 130)
    _exit_now("stopped by a second signal, without saving what was in flight; what was "
              "saved before is kept.", 130)
