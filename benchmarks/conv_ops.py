r"""ConvDraw's convolutions one by one: XLA beside PyTorch, per operation.

  pip install -e '.[bench]'
  python -m benchmarks.conv_ops --json=conv_ops.json

Where ``benchmarks.step_time`` times whole training steps, this times the
pieces that dominate ConvDraw's: its stride-1 convolutions, each in the three
forms a training step runs, at the shapes of one recurrent step t >= 2 of a
preset (``--preset``, default ``mnist_cpu``; batch ``--batch``):

  encoder gates   [error read, h^dec_{t-1}, h^enc_{t-1}] -> 4 hidden   (read of x: once, not here)
  decoder gates   [z_t, h^dec_{t-1}]                     -> 4 hidden
  posterior       h^enc_t                                -> 2 latent
  prior           h^dec_{t-1}                            -> 2 latent

  forward          y = conv(x, w)                         (NHWC, HWIO, 'SAME')
  input gradient   dx = d<dy, conv(x, w)>/dx
  kernel gradient  dw = d<dy, conv(x, w)>/dw

JAX: each one jitted alone (``jax.vjp`` of ``lax.conv_general_dilated``), with
ConvDraw's config's XLA flags (``configs/paper.py``; ``--noconfig_xla_flags``:
this process's ``$XLA_FLAGS`` alone). Torch: ``conv2d``, ``grad.conv2d_input``
and ``grad.conv2d_weight`` under ``no_grad``, in every configuration asked for
(``--torch_threads`` x ``--torch_layouts``; the best per operation is the
reference), as ``benchmarks.torch_models``' ConvDraw twin runs them. Before
timing, every operation is computed by both on the same numbers and the
largest relative difference recorded. Every round times one window of each
runner of an operation back to back (``benchmarks.timing``); the numbers are
medians over ``--rounds`` windows of ``--seconds``. ``--onednn=direct,winograd``
adds ``geco_jax.ops.onednn.conv2d_same``'s algorithms to the same rounds (the
``onednn`` extra): oneDNN's direct convolution and Winograd's F(2x2, 3x3).

The summary weights each operation by the calls of one training step at these
shapes (T calls each; the steps t = 1 skip most of it, so this overstates both
frameworks alike) and gives the convolutions' time per step in each framework.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from benchmarks import timing

_PRESET = flags.DEFINE_string("preset", "mnist_cpu", "ConvDraw preset (its shapes).")
_BATCH = timing.shared_flag("batch", lambda: flags.DEFINE_integer(
    "batch", 32, "Batch size (convdraw_mnist.py's: 32)."))
_SECONDS, _ROUNDS, _JSON = timing.run_flags(
    __name__, seconds=0.5, rounds=7, json_path="conv_ops.json")
_TORCH, _TORCH_LAYOUTS, _TORCH_THREADS = timing.torch_flags(__name__)
_CONFIG_XLA_FLAGS = timing.shared_flag("config_xla_flags", lambda: flags.DEFINE_bool(
    "config_xla_flags", True,
    "Add ConvDraw's config's xla_flags to $XLA_FLAGS before JAX starts, as "
    "experiments.main does."))

_ONEDNN = flags.DEFINE_list(
    "onednn", [],
    "Also time geco_jax.ops.onednn.conv2d_same with these algorithms (direct, winograd) "
    "in the same rounds, as ConvDraw's convolutions='onednn' and 'onednn_winograd' run "
    "them (needs the onednn extra).")

OPERATIONS = ("forward", "input gradient", "kernel gradient")


def convolutions(preset: str, batch: int) -> list[dict]:
  """The stride-1 convolutions of one ConvDraw step t >= 2 of ``preset``."""
  from geco_jax.models import convdraw

  p = convdraw.convdraw_preset(preset)
  height, width = p["image_shape"][0] // 2, p["image_shape"][1] // 2
  hidden, latent, read = p["hidden_channels"], p["latent_channels"], p["read_channels"]
  shape = dict(batch=batch, height=height, width=width, kernel=p["kernel_size"])
  return [
      dict(name="encoder gates", in_channels=read + 2 * hidden, out_channels=4 * hidden,
           **shape),
      dict(name="decoder gates", in_channels=latent + hidden, out_channels=4 * hidden,
           **shape),
      dict(name="posterior", in_channels=hidden, out_channels=2 * latent, **shape),
      dict(name="prior", in_channels=hidden, out_channels=2 * latent, **shape),
  ]


def flops(conv: dict) -> float:
  """Multiply-adds x 2 of each operation (all three have the same count)."""
  return (2.0 * conv["batch"] * conv["height"] * conv["width"] * conv["kernel"] ** 2
          * conv["in_channels"] * conv["out_channels"])


def _arrays(conv: dict, seed: int = 0):
  import numpy as np

  rng = np.random.default_rng(seed)
  n, h, w, k = conv["batch"], conv["height"], conv["width"], conv["kernel"]
  x = rng.standard_normal((n, h, w, conv["in_channels"]), dtype=np.float32)
  kernel = rng.standard_normal((k, k, conv["in_channels"], conv["out_channels"]),
                               dtype=np.float32)
  kernel = (kernel / np.sqrt(k * k * conv["in_channels"])).astype(np.float32)
  dy = rng.standard_normal((n, h, w, conv["out_channels"]), dtype=np.float32)
  return x, kernel, dy


def jax_operations(conv: dict, onednn_algorithm: str | None = None) -> dict:
  """Jitted JAX forms of the three operations and their arguments.

  XLA's convolution, or with ``onednn_algorithm`` geco_jax.ops.onednn's.
  """
  import jax
  import jax.numpy as jnp

  def apply(x, kernel):
    if onednn_algorithm is not None:
      from geco_jax.ops import onednn  # noqa: PLC0415
      return onednn.conv2d_same(x, kernel, onednn_algorithm)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  x, kernel, dy = (jnp.asarray(a) for a in _arrays(conv))
  return {
      "forward": (jax.jit(apply), (x, kernel)),
      "input gradient": (jax.jit(lambda x, k, dy: jax.vjp(lambda x: apply(x, k), x)[1](dy)[0]),
                         (x, kernel, dy)),
      "kernel gradient": (jax.jit(lambda x, k, dy: jax.vjp(lambda k: apply(x, k), k)[1](dy)[0]),
                          (x, kernel, dy)),
  }


def torch_operations(torch, conv: dict, layout: str) -> dict:
  """The torch forms (NCHW / OIHW tensors in ``layout``), results back as NHWC / HWIO."""
  memory_format = {"nchw": torch.contiguous_format,
                   "channels_last": torch.channels_last}[layout]
  x, kernel, dy = _arrays(conv)
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=memory_format)
  kernel = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).contiguous(
      memory_format=memory_format)
  dy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()).contiguous(
      memory_format=memory_format)
  padding = conv["kernel"] // 2
  grad = torch.nn.grad

  def no_grad(fn):
    def run():
      with torch.no_grad():
        return fn()
    return run

  return {
      "forward": (no_grad(lambda: torch.nn.functional.conv2d(x, kernel, padding=padding)),
                  (0, 2, 3, 1)),
      "input gradient": (no_grad(lambda: grad.conv2d_input(x.shape, kernel, dy,
                                                           padding=padding)),
                         (0, 2, 3, 1)),
      "kernel gradient": (no_grad(lambda: grad.conv2d_weight(x, kernel.shape, dy,
                                                             padding=padding)),
                          (2, 3, 1, 0)),
  }


def measure(torch, conv: dict) -> dict:
  """Times every operation of ``conv``: JAX and each torch configuration."""
  import jax
  import numpy as np

  entry = dict(conv, gflop=flops(conv) / 1e9, load_start=timing.load(), operations={})
  jax_ops = jax_operations(conv)
  onednn_ops = {algorithm: jax_operations(conv, algorithm) for algorithm in _ONEDNN.value}
  torch_ops = ({layout: torch_operations(torch, conv, layout) for layout in
                _TORCH_LAYOUTS.value} if torch is not None else {})
  for op in OPERATIONS:
    fn, args = jax_ops[op]
    reference = np.asarray(fn(*args))
    runners = [timing.Runner("jax", lambda fn=fn, args=args: fn(*args),
                             jax.block_until_ready)]
    onednn_runners, onednn_differences = [], {}
    for algorithm, ops in onednn_ops.items():
      ofn, oargs = ops[op]
      value = np.asarray(ofn(*oargs))
      onednn_differences[algorithm] = float(np.max(np.abs(value - reference))
                                            / np.max(np.abs(reference)))
      onednn_runners.append(timing.Runner(f"onednn {algorithm}",
                                          lambda fn=ofn, args=oargs: fn(*args),
                                          jax.block_until_ready))
    difference = 0.0
    for layout, ops in torch_ops.items():
      torch_fn, to_jax_axes = ops[op]
      value = torch_fn().permute(*to_jax_axes).contiguous().numpy()
      difference = max(difference, float(np.max(np.abs(value - reference))
                                         / np.max(np.abs(reference))))
      for threads in timing.thread_counts(_TORCH_THREADS.value):
        runners.append(timing.Runner(
            f"{layout}/{threads}t", torch_fn,
            setup=lambda threads=threads: torch.set_num_threads(threads)))
    timing.interleave(runners + onednn_runners, _ROUNDS.value, _SECONDS.value)
    jax_rate = runners[0].median
    result = {"jax_ms": 1e3 / jax_rate, "jax_gflops_per_s": flops(conv) * jax_rate / 1e9,
              "torch": {r.name: 1e3 / r.median for r in runners[1:]}}
    best = max(runners[1:], key=lambda r: r.median) if len(runners) > 1 else None
    if onednn_runners:
      result["onednn"] = {}
      for algorithm, runner in zip(onednn_ops, onednn_runners):
        result["onednn"][algorithm] = {
            "ms": 1e3 / runner.median, "gflops_per_s": flops(conv) * runner.median / 1e9,
            "ratio_to_xla": timing.paired_ratio(runner, runners[0]),
            "max_relative_difference_to_xla": onednn_differences[algorithm]}
        if best is not None:
          result["onednn"][algorithm]["ratio_to_torch_best"] = timing.paired_ratio(runner, best)
    if best is not None:
      result.update(
          torch_best=best.name, torch_best_ms=1e3 / best.median,
          torch_best_gflops_per_s=flops(conv) * best.median / 1e9,
          ratio_jax_to_torch_best=timing.paired_ratio(runners[0], best),
          max_relative_difference=difference)
    entry["operations"][op] = result
  entry["load_end"] = timing.load()
  return entry


def summary(results: dict) -> dict:
  """The convolutions' milliseconds per training step (T calls of each) in each framework."""
  steps = results["num_steps"]
  jax_ms = sum(steps * o["jax_ms"] for c in results["convolutions"]
               for o in c["operations"].values())
  out = {"calls_per_step": steps, "jax_ms_per_step": jax_ms}
  algorithms = list(results["convolutions"][0]["operations"]["forward"].get("onednn", {}))
  if algorithms:
    out["onednn_ms_per_step"] = {
        a: sum(steps * o["onednn"][a]["ms"] for c in results["convolutions"]
               for o in c["operations"].values()) for a in algorithms}
  if all("torch_best_ms" in o for c in results["convolutions"]
         for o in c["operations"].values()):
    torch_ms = sum(steps * o["torch_best_ms"] for c in results["convolutions"]
                   for o in c["operations"].values())
    out.update(torch_best_ms_per_step=torch_ms, ratio_jax_to_torch=torch_ms / jax_ms)
    if algorithms:
      out["onednn_ratio_to_torch"] = {a: torch_ms / ms
                                      for a, ms in out["onednn_ms_per_step"].items()}
    out["by_operation"] = {
        op: {"jax_ms": sum(steps * c["operations"][op]["jax_ms"]
                           for c in results["convolutions"]),
             "torch_best_ms": sum(steps * c["operations"][op]["torch_best_ms"]
                                  for c in results["convolutions"])}
        for op in OPERATIONS}
  return out


def print_report(results: dict) -> None:
  m = results["machine"]
  print(f"\n{m['cpu']}, {m['cores']} cores; jax {m['jax']}, torch {m['torch']};"
        f" XLA_FLAGS={m['xla_flags']!r}")
  print(f"ConvDraw {results['preset']}, batch {results['batch']}: one step t >= 2's "
        f"stride-1 convolutions (medians of {results['rounds']} windows)")
  print(f"{'convolution':14s} {'channels':>9s} {'GFLOP':>6s} {'operation':16s}"
        f" {'JAX ms':>7s} {'GF/s':>5s} {'torch ms':>8s} {'GF/s':>5s} {'(config)':18s}"
        f" {'JAX/torch':>9s} {'max diff':>8s}")
  for c in results["convolutions"]:
    for op, o in c["operations"].items():
      print(f"{c['name']:14s} {c['in_channels']:4d}->{c['out_channels']:<4d}"
            f" {c['gflop']:6.3f} {op:16s} {o['jax_ms']:7.2f} {o['jax_gflops_per_s']:5.0f}"
            + (f" {o['torch_best_ms']:8.2f} {o['torch_best_gflops_per_s']:5.0f}"
               f" {o['torch_best']:18s} {o['ratio_jax_to_torch_best']:9.2f}"
               f" {o['max_relative_difference']:8.1e}" if "torch_best" in o else ""))
      for algorithm, a in o.get("onednn", {}).items():
        print(f"{'':14s} {'':9s} {'':6s} {'  onednn ' + algorithm:16s} {a['ms']:7.2f}"
              f" {a['gflops_per_s']:5.0f}  / XLA's {a['ratio_to_xla']:.2f}"
              + (f", / torch best {a['ratio_to_torch_best']:.2f}"
                 if "ratio_to_torch_best" in a else "")
              + f", max diff to XLA {a['max_relative_difference_to_xla']:.1e}")
  s = results["summary"]
  line = (f"\nPer training step ({s['calls_per_step']} calls of each):"
          f" JAX {s['jax_ms_per_step']:.0f} ms")
  if "torch_best_ms_per_step" in s:
    line += (f", torch best {s['torch_best_ms_per_step']:.0f} ms (JAX/torch speed"
             f" {s['ratio_jax_to_torch']:.2f}); by operation, JAX / torch ms: " + ", ".join(
                 f"{op} {v['jax_ms']:.0f} / {v['torch_best_ms']:.0f}"
                 for op, v in s["by_operation"].items()))
  print(line)
  for algorithm, ms in s.get("onednn_ms_per_step", {}).items():
    print(f"  onednn {algorithm}: {ms:.0f} ms per step"
          + (f" (speed / torch best {s['onednn_ratio_to_torch'][algorithm]:.2f})"
             if "onednn_ratio_to_torch" in s else ""))
  print(f"load average (1, 5, 15 min): start {results['load_start']}, end {results['load_end']}")


def _set_xla_flags() -> None:
  """ConvDraw's config's flags into $XLA_FLAGS (the environment's value wins).

  XLA reads them when JAX's backend starts, which nothing before this has done.
  """
  if not _CONFIG_XLA_FLAGS.value:
    return
  from configs import convdraw_mnist

  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=", 1)[0] for f in current}
  wanted = [f for f in convdraw_mnist.get_config().get("xla_flags", "").split()
            if f.split("=", 1)[0] not in names]
  os.environ["XLA_FLAGS"] = " ".join(wanted + current)


def main(argv):
  del argv
  if _BATCH.value < 1 or _ROUNDS.value < 1 or _SECONDS.value <= 0:
    raise app.UsageError("--batch and --rounds must be >= 1 and --seconds > 0.")
  _set_xla_flags()
  from geco_jax.models import convdraw

  if _PRESET.value not in convdraw.PRESETS:
    raise app.UsageError(f"--preset must be one of {sorted(convdraw.PRESETS)}; "
                         f"got {_PRESET.value!r}.")
  from geco_jax.ops import onednn

  unknown = [a for a in _ONEDNN.value if a not in onednn.ALGORITHMS]
  if unknown or len(set(_ONEDNN.value)) != len(_ONEDNN.value):
    raise app.UsageError(f"--onednn takes distinct values among {', '.join(onednn.ALGORITHMS)}; "
                         f"got {','.join(_ONEDNN.value)}.")
  if _ONEDNN.value:
    ok, why = onednn.available()
    if not ok:
      raise app.UsageError(f"--onednn: {why}")
  torch = timing.import_torch(_TORCH.value)
  import jax

  machine = {"cpu": timing.cpu_name(), "cores": os.cpu_count(),
             "jax": jax.__version__, "backend": jax.default_backend(),
             "torch": torch.__version__ if torch is not None else None,
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
  results = {"machine": machine, "preset": _PRESET.value, "batch": _BATCH.value,
             "num_steps": convdraw.PRESETS[_PRESET.value]["num_steps"],
             "rounds": _ROUNDS.value, "seconds": _SECONDS.value, "load_start": timing.load(),
             "convolutions": []}
  for conv in convolutions(_PRESET.value, _BATCH.value):
    results["convolutions"].append(measure(torch, conv))
    print(f"[{conv['name']} done]", flush=True)
  results["load_end"] = timing.load()
  results["summary"] = summary(results)
  print_report(results)
  timing.write_results(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
