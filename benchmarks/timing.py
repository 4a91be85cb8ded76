"""Shared by the benchmarks: interleaved timing windows, medians, load, torch settings."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Optional

from absl import flags


def window(step: Callable, block: Callable, seconds: float) -> float:
  """Steps/s over one window of at least ``seconds`` (and one step).

  ``step()`` starts a step and returns something ``block`` waits on; one step
  stays in flight while the host starts the next (the trainer never waits).
  """
  count, pending = 0, None
  start = time.perf_counter()
  while True:
    handle = step()
    if pending is not None:
      block(pending)
    pending = handle
    count += 1
    if time.perf_counter() - start >= seconds:
      break
  block(pending)
  return count / (time.perf_counter() - start)


class Runner:
  """Something timed in windows: a name, one step, and what to wait on."""

  def __init__(self, name: str, step: Callable, block: Callable = lambda _: None,
               setup: Callable = lambda: None, seconds: Optional[float] = None):
    self.name, self.step, self.block, self.setup = name, step, block, setup
    self.seconds = seconds
    self.rates: list[float] = []

  def warm_up(self):
    self.setup()
    for _ in range(2):
      self.block(self.step())

  def time_window(self, seconds: float):
    self.setup()
    self.rates.append(window(self.step, self.block, self.seconds or seconds))

  @property
  def median(self) -> float:
    return statistics.median(self.rates)


def interleave(runners: list[Runner], rounds: int, seconds: float) -> None:
  """``rounds`` rounds of one window per runner; every other round reversed."""
  for runner in runners:
    runner.warm_up()
  for r in range(rounds):
    for runner in (runners if r % 2 == 0 else runners[::-1]):
      runner.time_window(seconds)


def paired_ratio(a: Runner, b: Runner) -> float:
  """Median over rounds of a's rate / b's rate in the same round."""
  return statistics.median(x / y for x, y in zip(a.rates, b.rates))


def load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def import_torch(mode: str):
  """torch for ``--torch=mode``: 'off' None, 'auto' None when it is missing, 'on' required."""
  if mode == "off":
    return None
  try:
    import torch
  except ImportError:
    if mode == "on":
      raise
    return None
  return torch


def thread_counts(values: list[str]) -> list[int]:
  """``--torch_threads`` values ('max' = os.cpu_count()), distinct, largest first."""
  return sorted({os.cpu_count() if t == "max" else int(t) for t in values}, reverse=True)


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), else ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def shared_flag(name: str, define: Callable[[], flags.FlagHolder]) -> flags.FlagHolder:
  """``define()`` (a ``flags.DEFINE_...`` of ``name``), unless this process has that flag.

  The benchmarks share flag names (--seconds, --rounds, --json, --torch, ...):
  each defines its own through this, so that a process importing two of them
  (the tests; ``convdraw_noise``, which times ``step_time``'s steps) shares the
  first one's flag instead of failing on a duplicate. The module run as the
  program defines and documents its own (``define`` is called from that module,
  which absl's --help attributes it to).
  """
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define()


def _register_key_flags(module_name: str, holders) -> None:
  """List ``holders``' flags in the ``--help`` of module ``module_name`` (its ``__name__``)."""
  import sys  # pylint: disable=import-outside-toplevel

  module = sys.argv[0] if module_name == "__main__" else module_name   # as absl names it
  for holder in holders:
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[holder.name])


def run_flags(module_name: str, *, seconds: float, rounds: int, json_path: str):
  """A benchmark's ``--seconds``, ``--rounds`` and ``--json``, with its defaults.

  Every benchmark has them: defined once per process (``shared_flag``), their
  defaults set to the calling benchmark's (in the whole process: the last
  benchmark imported sets them) and listed in its ``--help`` (``module_name``:
  its ``__name__``). Returns their holders.
  """
  holders = (
      shared_flag("seconds", lambda: flags.DEFINE_float(
          "seconds", seconds, "Length of each timed window.")),
      shared_flag("rounds", lambda: flags.DEFINE_integer(
          "rounds", rounds, "Timed windows per runner (interleaved).")),
      shared_flag("json", lambda: flags.DEFINE_string(
          "json", json_path, "Where to write the results ('' = not).")))
  for holder, value in zip(holders, (seconds, rounds, json_path)):
    flags.FLAGS.set_default(holder.name, value)
  _register_key_flags(module_name, holders)
  return holders


def torch_flags(module_name: str):
  """``--torch``, ``--torch_layouts`` and ``--torch_threads`` of a benchmark timing torch too."""
  holders = (
      shared_flag("torch", lambda: flags.DEFINE_enum(
          "torch", "auto", ["auto", "on", "off"], "Time torch too: auto = when torch imports.")),
      shared_flag("torch_layouts", lambda: flags.DEFINE_list(
          "torch_layouts", ["nchw", "channels_last"], "torch memory formats to try.")),
      shared_flag("torch_threads", lambda: flags.DEFINE_list(
          "torch_threads", ["max", "1"],
          "torch intra-op threads to try ('max' = os.cpu_count()).")))
  _register_key_flags(module_name, holders)
  return holders


def write_results(path: str, results: dict) -> None:
  """``results`` as JSON at ``path`` ('' = not written), and say where."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {path}")

