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


def write_results(path: str, results: dict) -> None:
  """``results`` as JSON at ``path`` ('' = not written), and say where."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {path}")

