r"""What drawing ConvDraw's noise costs in its training step (docs/performance.md, lever 36).

  python -m benchmarks.convdraw_noise --json=convdraw_noise.json

ConvDraw's training step draws all its reparameterisation noise up front,
``jax.random.normal(rng, [T, batch, H/2, W/2, latent])`` (401,408 normals for
``mnist_cpu`` at batch 32), with JAX's default generator (threefry2x32, then
the inverse error function). This compiles the trainer's real step
(``experiments.train.Experiment.step_fn``, ``configs/convdraw_mnist.py`` with its
XLA flags) once per variant of that one call, in one process, and times the
variants in interleaved windows (``benchmarks.timing``: lever 17's method;
JAX's caches are cleared before each variant is traced, so each is its own
program):

  base, base2   the model as it is (base2: a second copy, the probe's noise floor)
  zeros         no noise at all (a diagnostic: what the noise costs at most;
                not a model)
  rbg           the same normals' distribution from a key of JAX's ``rbg``
                generator (XLA's RngBitGenerator) derived from the step's key
  unsafe_rbg    the same with ``unsafe_rbg``

"x of base" is the median over rounds of each variant's steps/s over base's
in the same round. Also times the noise alone (one jitted call of each
generator at the model's noise shape, the median of ``--rounds`` windows).

It shares ``benchmarks.step_time``'s flags (``--seconds``, ``--rounds``,
``--json`` with this benchmark's defaults; ``--size``, ``--convdraw_convolutions``,
``--convdraw_recurrence`` and ``--noconfig_xla_flags`` pick the step as there).
Importing this module sets those defaults in the whole process.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from benchmarks import step_time
from benchmarks import timing

VARIANTS = ("base", "base2", "zeros", "rbg", "unsafe_rbg")

_VARIANTS = flags.DEFINE_list("noise_variants", list(VARIANTS),
                              f"Any of {VARIANTS}; the first is the reference.")
_BATCH = timing.shared_flag("batch", lambda: flags.DEFINE_integer(
    "batch", 32, "Batch size (convdraw_mnist.py's: 32)."))
# --seconds, --rounds and --json (shared with benchmarks.step_time, imported
# for its JaxStep), with this benchmark's defaults.
_SECONDS, _ROUNDS, _JSON = timing.run_flags(
    __name__, seconds=1.5, rounds=15, json_path="convdraw_noise.json")


def normal_generators() -> dict:
  """Each variant's stand-in for ``jax.random.normal(key, shape, dtype)``."""
  import jax
  import jax.numpy as jnp

  normal = jax.random.normal

  def from_impl(impl):
    def draw(key, shape, dtype=jnp.float32):
      # A key of the other generator, derived from this one: deterministic in key.
      data = jax.random.bits(key, (4,), jnp.uint32)
      return normal(jax.random.wrap_key_data(data, impl=impl), shape, dtype)
    return draw

  return {"base": normal, "base2": normal,
          "zeros": lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype),
          "rbg": from_impl("rbg"), "unsafe_rbg": from_impl("unsafe_rbg")}


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown or not _VARIANTS.value:
    raise app.UsageError(
        f"--noise_variants must name some of {VARIANTS}; got {_VARIANTS.value}.")
  if _BATCH.value < 1 or _ROUNDS.value < 1 or _SECONDS.value <= 0:
    raise app.UsageError("--batch and --rounds must be >= 1 and --seconds > 0.")
  from experiments import cli

  if step_time._CONFIG_XLA_FLAGS.value:   # pylint: disable=protected-access
    # Before JAX starts, as experiments.main does (the environment's flags win).
    cli.apply_xla_flags(step_time._config("convdraw"))   # pylint: disable=protected-access
  import jax
  import numpy as np

  from geco_jax.models import convdraw

  generators = normal_generators()
  images = np.random.default_rng(0).random((_BATCH.value * 4, 28, 28, 1), np.float32)
  results = {"machine": {"cpu": timing.cpu_name(), "cores": os.cpu_count(),
                         "jax": jax.__version__, "backend": jax.default_backend(),
                         "xla_flags": os.environ.get("XLA_FLAGS", "")},
             "batch": _BATCH.value, "rounds": _ROUNDS.value, "seconds": _SECONDS.value,
             "load_start": timing.load(), "variants": {}, "alone_ms": {}}
  runners, shapes = [], set()
  original = convdraw.jax.random.normal
  for name in _VARIANTS.value:
    jax.clear_caches()   # else the trace cache would hand back base's program

    def recording(key, shape, dtype=jax.numpy.float32, generate=generators[name]):
      shapes.add(tuple(shape))   # the model's own noise shape, for the timing alone
      return generate(key, shape, dtype)

    convdraw.jax.random.normal = recording
    try:
      step = step_time.JaxStep(step_time._config("convdraw", batch_size=_BATCH.value),
                               images, jax.devices())
    finally:
      convdraw.jax.random.normal = original
    results["variants"][name] = {"compile_s": step.compile_s, "gflop": step.flops / 1e9}
    runners.append(step.runner(name))
    print(f"{name}: compiled in {step.compile_s:.1f} s, {step.flops / 1e9:.3f} GFLOP",
          flush=True)
  timing.interleave(runners, _ROUNDS.value, _SECONDS.value)
  for runner in runners:
    results["variants"][runner.name].update(
        steps_per_s=runner.median, rates=runner.rates,
        x_of_base=timing.paired_ratio(runner, runners[0]))

  # The noise alone, one jitted call per generator, at the step's shape (the
  # largest drawn: model.init draws for one example).
  shape = max(shapes, key=lambda s: int(np.prod(s)))
  results["noise_shape"] = list(shape)
  key = jax.random.PRNGKey(0)
  alone = [timing.Runner(name, lambda f=jax.jit(generators[name], static_argnums=1): f(key, shape),
                         jax.block_until_ready, seconds=0.2)
           for name in ("base", "rbg", "unsafe_rbg")]
  timing.interleave(alone, _ROUNDS.value, 0.2)
  for runner in alone:
    results["alone_ms"][runner.name] = 1e3 / runner.median
  results["load_end"] = timing.load()

  print(f"\nConvDraw (noise {shape}), batch {_BATCH.value}: the trainer's step, "
        f"{_ROUNDS.value} rounds of {_SECONDS.value} s (load {results['load_start'][0]} -> "
        f"{results['load_end'][0]})")
  for name, r in results["variants"].items():
    print(f"{name:11s} {r['steps_per_s']:6.3f} steps/s  x of {_VARIANTS.value[0]} "
          f"{r['x_of_base']:.3f}  ({r['gflop']:.3f} GFLOP)")
  print(f"noise alone ({int(np.prod(shape)):,} normals, ms): " + ", ".join(
      f"{k} {v:.2f}" for k, v in results["alone_ms"].items()))
  timing.write_results(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
