r"""Where ConvDraw's training step spends its time, JAX beside torch (docs/performance.md).

  pip install -e '.[bench,onednn]'     # torch, oneDNN and a C++ compiler
  python -m benchmarks.convdraw_parts --json=convdraw_parts.json

Splits the step in two: its stride-1 convolutions (the gate, prior and
posterior convolutions: about 37 of the CPU preset's 38 GFLOP) and everything
else (the strided reads and the write, the LSTMs' elementwise work, the KL, the
noise, the loss, Adam, GECO, and for JAX the trainer's metrics and guard).
It times, in interleaved windows of one process (``benchmarks.timing``):

  jax xla       the trainer's step (``experiments.train.Experiment.step_fn``,
                ``configs/convdraw_mnist.py`` with its XLA flags), XLA's convolutions
  jax onednn    the same with ``convolutions='onednn'`` (``geco_jax.ops.onednn``)
  jax onednn_winograd
                the same with ``convolutions='onednn_winograd'`` (the gates by
                Winograd's F(2x2, 3x3); its kernel transforms, in JAX, count as
                convolution time)
  jax skip      the onednn program with its convolution handlers replaced by one
                that does no work (``benchmarks/skip_conv.cc``): everything but
                the stride-1 convolutions
  torch         the twin (``benchmarks.torch_models``), channels_last with as
                many threads as cores (its best setting in every stored run)
  torch skip    the twin with the same convolutions replaced by a no-op autograd
                function (forward and both gradients return uninitialised tensors)

The skip variants compute nothing meaningful (their values are whatever the
buffers held) and are diagnostics only. The convolutions' share is the whole
step's time less the skip variant's, per round; "JAX / torch" is a speed ratio
(torch's ms over JAX's in the same round), the median over rounds. XLA's
convolutions come with the layout transposes XLA adds for them, which the
skip variant, built on the onednn program, does not have: they count as
convolution time.

Needs torch (the ``bench`` extra), oneDNN (the ``onednn`` extra) and a C++
compiler; without them it stops with one line saying which. It shares
``benchmarks.step_time``'s flags (``--seconds``, ``--rounds``, ``--json`` with
this benchmark's defaults; ``--size``, ``--convdraw_recurrence`` and
``--noconfig_xla_flags`` pick the step as there).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import statistics

from absl import app
from absl import flags

from benchmarks import step_time
from benchmarks import timing

_SKIP_SOURCE = pathlib.Path(__file__).with_name("skip_conv.cc")
_SKIP_TARGET = "GecoBenchmarkSkipConv"

_BATCH = timing.shared_flag("batch", lambda: flags.DEFINE_integer(
    "batch", 32, "Batch size (convdraw_mnist.py's: 32)."))
# --seconds, --rounds and --json (shared with benchmarks.step_time, imported
# for its JaxStep), with this benchmark's defaults.
_SECONDS, _ROUNDS, _JSON = timing.run_flags(
    __name__, seconds=1.5, rounds=9, json_path="convdraw_parts.json")


def register_skip_handler() -> None:
  """Build (once, cached) and register ``skip_conv.cc``'s handler on the CPU."""
  import jax

  from geco_jax.ops import onednn

  library = ctypes.CDLL(str(onednn.build_ffi_library(_SKIP_SOURCE, "skip_conv", [])))
  jax.ffi.register_ffi_target(_SKIP_TARGET, jax.ffi.pycapsule(getattr(library, _SKIP_TARGET)),
                              platform="cpu")


def jax_skip_step(config, images, devices) -> step_time.JaxStep:
  """The onednn step traced with every convolution handler replaced by the skip handler."""
  import jax

  from geco_jax.ops import onednn

  targets = dict(onednn._TARGETS)   # pylint: disable=protected-access
  jax.clear_caches()   # else the trace cache would hand back the onednn program
  onednn._TARGETS.update({op: _SKIP_TARGET for op in targets})   # pylint: disable=protected-access
  try:
    return step_time.JaxStep(config, images, devices)
  finally:
    onednn._TARGETS.update(targets)   # pylint: disable=protected-access
    jax.clear_caches()


def torch_skip_runner(torch, config, images, threads: int) -> timing.Runner:
  """``step_time.torch_runner`` whose stride-1 convolutions do no work while it steps."""
  from benchmarks import torch_models

  class Skip(torch.autograd.Function):   # pylint: disable=abstract-method
    @staticmethod
    def forward(ctx, x, w):   # pylint: disable=arguments-differ
      ctx.shapes = x.shape, w.shape
      return torch.empty(x.shape[0], w.shape[0], *x.shape[2:]).contiguous(
          memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):   # pylint: disable=arguments-differ
      del grad
      x_shape, w_shape = ctx.shapes
      return (torch.empty(x_shape).contiguous(memory_format=torch.channels_last),
              torch.empty(w_shape))

  original = torch_models._conv_same, torch_models.SameConv2d.forward  # pylint: disable=protected-access

  def same_conv_forward(self, x):
    if self.stride == (1, 1):
      return Skip.apply(x, self.weight) + self.bias.view(1, -1, 1, 1)
    return original[1](self, x)

  skipping = (lambda x, w: Skip.apply(x, w)), same_conv_forward
  runner = step_time.torch_runner(torch, config, images, "channels_last", threads)
  step = runner.step

  def skipping_step():
    torch_models._conv_same, torch_models.SameConv2d.forward = skipping  # pylint: disable=protected-access
    try:
      return step()
    finally:
      torch_models._conv_same, torch_models.SameConv2d.forward = original  # pylint: disable=protected-access

  runner.step = skipping_step
  runner.name = "torch skip"
  return runner


# The JAX steps timed whole, each against the same skip program.
CONVOLUTIONS = ("xla", "onednn", "onednn_winograd")


def parts(runners: dict) -> dict:
  """Per-round milliseconds of each part and JAX / torch speed ratios, as medians."""
  ms = {name: [1e3 / rate for rate in r.rates] for name, r in runners.items()}
  rounds = range(len(ms["torch"]))
  out = {"step_ms": {name: statistics.median(v) for name, v in ms.items()}}
  torch_convs = [ms["torch"][i] - ms["torch skip"][i] for i in rounds]
  out["outside_convolutions"] = {
      "jax_ms": out["step_ms"]["jax skip"], "torch_ms": out["step_ms"]["torch skip"],
      "jax_over_torch": statistics.median(
          ms["torch skip"][i] / ms["jax skip"][i] for i in rounds)}
  out["convolutions"] = {"torch_ms": statistics.median(torch_convs)}
  for convolutions in CONVOLUTIONS:
    if f"jax {convolutions}" not in ms:
      continue
    jax_convs = [ms[f"jax {convolutions}"][i] - ms["jax skip"][i] for i in rounds]
    out["convolutions"][f"jax_{convolutions}_ms"] = statistics.median(jax_convs)
    out["convolutions"][f"jax_{convolutions}_over_torch"] = statistics.median(
        t / j for t, j in zip(torch_convs, jax_convs))
    out[f"step_jax_{convolutions}_over_torch"] = statistics.median(
        ms["torch"][i] / ms[f"jax {convolutions}"][i] for i in rounds)
  return out


def main(argv):
  del argv
  if _BATCH.value < 1 or _ROUNDS.value < 1 or _SECONDS.value <= 0:
    raise app.UsageError("--batch and --rounds must be >= 1 and --seconds > 0.")
  torch = timing.import_torch("auto")
  if torch is None:
    raise app.UsageError("convdraw_parts needs torch: pip install -e '.[bench]' "
                         "(--extra-index-url https://download.pytorch.org/whl/cpu).")
  from experiments import cli
  from geco_jax.ops import onednn

  try:
    onednn.check_installed()
  except onednn.OneDNNUnavailable as e:
    raise app.UsageError(f"convdraw_parts needs oneDNN and a C++ compiler: {e}")
  config = step_time._config("convdraw", batch_size=_BATCH.value)  # pylint: disable=protected-access
  if step_time._CONFIG_XLA_FLAGS.value:   # pylint: disable=protected-access
    cli.apply_xla_flags(config)   # before JAX starts, as experiments.main does
  import jax
  import numpy as np

  try:
    onednn.require()
    register_skip_handler()
  except onednn.OneDNNUnavailable as e:
    raise app.UsageError(str(e))
  images = np.random.default_rng(0).random((_BATCH.value * 4, 28, 28, 1), np.float32)
  devices = jax.devices()
  steps = {"jax xla": step_time.JaxStep(step_time._config(  # pylint: disable=protected-access
               "convdraw", batch_size=_BATCH.value, convolutions="xla"), images, devices)}
  onednn_config = step_time._config(  # pylint: disable=protected-access
      "convdraw", batch_size=_BATCH.value, convolutions="onednn")
  steps["jax onednn"] = step_time.JaxStep(onednn_config, images, devices)
  steps["jax onednn_winograd"] = step_time.JaxStep(step_time._config(  # pylint: disable=protected-access
      "convdraw", batch_size=_BATCH.value, convolutions="onednn_winograd"), images, devices)
  steps["jax skip"] = jax_skip_step(onednn_config, images, devices)
  runners = {name: step.runner(name) for name, step in steps.items()}
  threads = os.cpu_count()
  runners["torch"] = step_time.torch_runner(torch, config, images, "channels_last", threads)
  runners["torch skip"] = torch_skip_runner(torch, config, images, threads)
  load_start = timing.load()
  timing.interleave(list(runners.values()), _ROUNDS.value, _SECONDS.value)
  results = {"machine": {"cpu": timing.cpu_name(), "cores": os.cpu_count(),
                         "jax": jax.__version__, "torch": torch.__version__,
                         "xla_flags": os.environ.get("XLA_FLAGS", "")},
             "batch": _BATCH.value, "rounds": _ROUNDS.value, "seconds": _SECONDS.value,
             "torch_threads": threads, "load_start": load_start, "load_end": timing.load(),
             # XLA's count for each program (none inside the custom calls).
             "gflop": {name: step.xla_flops / 1e9 for name, step in steps.items()},
             "rates": {name: r.rates for name, r in runners.items()}}
  results.update(parts(runners))

  print(f"\nConvDraw, batch {_BATCH.value}: {_ROUNDS.value} rounds of {_SECONDS.value} s "
        f"(load {load_start[0]} -> {results['load_end'][0]}); torch channels_last, "
        f"{threads} threads; ms per step (medians)")
  for name, value in results["step_ms"].items():
    print(f"  {name:19s} {value:7.1f}")
  out, convs = results["outside_convolutions"], results["convolutions"]
  print(f"outside the stride-1 convolutions: JAX {out['jax_ms']:.1f}, torch "
        f"{out['torch_ms']:.1f}; JAX / torch {out['jax_over_torch']:.2f}")
  for convolutions in CONVOLUTIONS:
    print(f"the stride-1 convolutions, JAX {convolutions}: "
          f"{convs[f'jax_{convolutions}_ms']:.1f} against torch {convs['torch_ms']:.1f}; "
          f"JAX / torch {convs[f'jax_{convolutions}_over_torch']:.2f} (whole step "
          f"{results[f'step_jax_{convolutions}_over_torch']:.2f})")
  timing.write_results(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
