r"""XLA options compared in one process on a model's training step (docs/performance.md, lever 37).

  python -m benchmarks.xla_options --json=xla_options.json
  python -m benchmarks.xla_options --model=conv_vae \
      --variant='ftz:xla_cpu_ftz=true' --variant='no_emitters:xla_cpu_use_fusion_emitters=false'

XLA reads ``$XLA_FLAGS`` once per process, so comparing flags across fresh
processes (levers 5 and 22) mixes their effect with the process-to-process
spread (about +-8% on the project's 2-core CPU). The same options can also be
given to one compilation (``jax.jit(...).lower(...).compile(compiler_options=
...)``): this compiles the trainer's real step (``experiments.train.Experiment.
step_fn``, the model's config with its own XLA flags) once per variant, in one
process, and times the variants in interleaved windows (``benchmarks.timing``:
lever 17's method). "x of base" is the median over rounds of a variant's
steps/s over base's in the same round; ``base2``, a second compilation of the
same program, shows the method's noise floor.

A variant is ``name:option=value,option=value`` (``--variant``, repeated; the
options are XLA's ``DebugOptions`` by name, as in ``$XLA_FLAGS`` without the
dashes; ``true``/``false`` and integers are read as such, anything else, e.g. an
enum's ``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``, as a string; a list option's
items are joined by ``+``, e.g. ``xla_cpu_experimental_ynn_fusion_type=
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT+LIBRARY_FUSION_TYPE_REDUCE``, and an empty
value clears it: ``xla_cpu_experimental_ynn_fusion_type=`` keeps YNNPACK out
of the program). Every variant's
options are checked by compiling a small function with them before any step
is compiled: an unknown option or value is one line and exit status 2.

Also reported per variant: whether its optimised HLO is the same text as
base's. Options that act in LLVM's code generation (``xla_cpu_ftz``,
``xla_cpu_enable_fast_min_max``, ``xla_cpu_prefer_vector_width``) leave the HLO
as it is and may still change the machine code; an option that changes
neither is timing base twice. JAX's persistent compilation cache is off in
this process, so that every variant is compiled, and timed compiling, afresh.

It shares ``benchmarks.step_time``'s flags (``--seconds``, ``--rounds``,
``--json`` with this benchmark's defaults; ``--size``,
``--convdraw_convolutions``, ``--convdraw_recurrence`` and
``--noconfig_xla_flags`` pick the step as there). Importing this module sets
those defaults in the whole process.
"""

from __future__ import annotations

import hashlib
import os

from absl import app
from absl import flags

from benchmarks import step_time
from benchmarks import timing

MODELS = ("convdraw", "conv_vae", "vae_nvp")

# Options of jaxlib 0.10.2's XLA:CPU not tried by levers 5, 16 and 22 (which
# tried multi_thread_eigen, use_onednn, ynn_fusion_type, fast_math,
# concurrency_optimized_scheduler and prefer_vector_width).
DEFAULT_VARIANTS = (
    "scheduler_memory:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "scheduler_concurrency:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "preset_fast_runtime:xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "no_fusion_emitters:xla_cpu_use_fusion_emitters=false",
    "tiling_propagation:xla_cpu_experimental_enable_tiling_propagation=true",
    "copy_region_analysis:xla_cpu_copy_insertion_use_region_analysis=true",
    "ftz:xla_cpu_ftz=true",
    "fast_min_max:xla_cpu_enable_fast_min_max=true",
)

_MODEL = flags.DEFINE_enum("model", "convdraw", MODELS, "The model whose step is timed.")
_VARIANT = flags.DEFINE_multi_string(
    "variant", list(DEFAULT_VARIANTS),
    "name:option=value,option=value (repeat the flag); 'base' and 'base2' (no "
    "options) always come first.")
_BATCH = timing.shared_flag("batch", lambda: flags.DEFINE_integer(
    "batch", None, "Batch size (default: the model's config's)."))
# --seconds, --rounds and --json (shared with benchmarks.step_time, imported
# for its JaxStep), with this benchmark's defaults.
_SECONDS, _ROUNDS, _JSON = timing.run_flags(
    __name__, seconds=1.5, rounds=15, json_path="xla_options.json")


def _value(text: str):
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def parse_variants(specs: list[str]) -> dict[str, dict]:
  """``{'base': {}, 'base2': {}, name: {option: value}}`` from ``--variant`` specs."""
  variants = {"base": {}, "base2": {}}
  for spec in specs:
    name, sep, options = spec.partition(":")
    name = name.strip()
    if not sep or not name or not options.strip():
      raise ValueError(f"--variant takes name:option=value[,option=value]; got {spec!r}.")
    if name in variants:
      raise ValueError(f"--variant names must be distinct (and not base, base2); got {name!r} twice.")
    parsed = {}
    for item in options.split(","):
      key, eq, value = item.partition("=")
      if not eq or not key.strip():
        raise ValueError(f"--variant {name!r}: {item!r} is not option=value.")
      # A list option's items are joined by '+' here (',' separates options):
      # XLA reads them comma-separated. An empty value clears a list option.
      parsed[key.strip().lstrip("-")] = _value(value.strip().replace("+", ","))
    variants[name] = parsed
  return variants


def check_options(variants: dict[str, dict]) -> None:
  """Compile a small function with each variant's options: XLA's error, as a ValueError."""
  import jax
  import jax.numpy as jnp

  lowered = jax.jit(lambda x: jnp.tanh(x) @ x).lower(jnp.ones((4, 4), jnp.float32))
  for name, options in variants.items():
    if options:
      try:
        lowered.compile(compiler_options=options)
      except Exception as e:  # XLA's INVALID_ARGUMENT (a JaxRuntimeError)
        raise ValueError(f"--variant {name!r}: XLA refuses {options}: "
                         f"{str(e).splitlines()[0]}") from None


def main(argv):
  del argv
  try:
    variants = parse_variants(_VARIANT.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  if _ROUNDS.value < 1 or _SECONDS.value <= 0 or (_BATCH.value is not None and _BATCH.value < 1):
    raise app.UsageError("--rounds and --batch must be >= 1 and --seconds > 0.")
  from experiments import cli

  config = step_time._config(_MODEL.value, batch_size=_BATCH.value)  # pylint: disable=protected-access
  if step_time._CONFIG_XLA_FLAGS.value:   # pylint: disable=protected-access
    cli.apply_xla_flags(config)   # before JAX starts, as experiments.main does
  import jax
  import numpy as np

  # Each variant compiled afresh: a persistent cache ($JAX_COMPILATION_CACHE_DIR)
  # would hand back an executable instead, with its own text and no compile time.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    check_options(variants)
  except ValueError as e:
    raise app.UsageError(str(e))
  images = np.random.default_rng(0).random((config.batch_size * 4, 28, 28, 1), np.float32)
  results = {"machine": {"cpu": timing.cpu_name(), "cores": os.cpu_count(),
                         "jax": jax.__version__, "backend": jax.default_backend(),
                         "xla_flags": os.environ.get("XLA_FLAGS", "")},
             "model": _MODEL.value, "batch": config.batch_size, "rounds": _ROUNDS.value,
             "seconds": _SECONDS.value, "load_start": timing.load(), "variants": {}}
  runners, base_digest = [], None
  for name, options in variants.items():
    jax.clear_caches()   # each variant its own trace and compilation
    step = step_time.JaxStep(config, images, jax.devices(), compiler_options=options)
    digest = hashlib.sha1(step.compiled.as_text().encode()).hexdigest()
    base_digest = base_digest or digest
    results["variants"][name] = {"options": options, "compile_s": step.compile_s,
                                 "gflop": step.flops / 1e9, "hlo_sha1": digest,
                                 "hlo_same_as_base": digest == base_digest}
    runners.append(step.runner(name))
    print(f"{name}: compiled in {step.compile_s:.1f} s, {step.flops / 1e9:.3f} GFLOP, HLO "
          + ("as base's" if digest == base_digest else "differs from base's"), flush=True)
  timing.interleave(runners, _ROUNDS.value, _SECONDS.value)
  results["load_end"] = timing.load()
  for runner in runners:
    results["variants"][runner.name].update(
        steps_per_s=runner.median, rates=runner.rates,
        x_of_base=timing.paired_ratio(runner, runners[0]))

  print(f"\n{_MODEL.value}, batch {config.batch_size}: the trainer's step, {_ROUNDS.value} "
        f"rounds of {_SECONDS.value} s (load {results['load_start'][0]} -> "
        f"{results['load_end'][0]}); XLA_FLAGS={results['machine']['xla_flags']!r}")
  for name, r in results["variants"].items():
    print(f"{name:24s} {r['steps_per_s']:7.3f} steps/s  x of base {r['x_of_base']:.3f}  "
          f"compile {r['compile_s']:5.1f} s  HLO {'same' if r['hlo_same_as_base'] else 'differs'}"
          f"  {r['options'] or ''}")
  timing.write_results(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
