r"""Training steps per second: geco_jax beside PyTorch twins of the same models.

  pip install -e '.[bench]'           # torch==2.13.0, the CPU build
  python -m benchmarks.step_time --json=step_time.json

On an NVIDIA GPU (JAX with CUDA and a CUDA build of torch; the numbers in
docs/performance.md came from ``benchmarks/accelerator_run.sh``):

  python -m benchmarks.step_time --size=accelerator --torch_device=cuda \
      --noconfig_xla_flags --sections=compare,pipeline --json=step_time_gpu.json

(``--noconfig_xla_flags``: the configs' XLA flags are XLA:CPU's.)

Sections (``--sections``, all by default):

compare
  For each model (``--models``: the default experiment's conv VAE, ConvDraw
  with the ``mnist_cpu`` preset, VAE+NVP with the ``cpu`` preset; MNIST shapes,
  each config's own batch size), the project's real training step
  (``experiments.train.Experiment.step_fn``: GECO + RE, Adam, metrics,
  non-finite guard, donated state) beside ``benchmarks.torch_models.GecoStep``
  (the same architecture, loss, optimiser and batch) in every torch
  configuration asked for (``--torch_layouts`` x ``--torch_threads``; the best
  is the reference), the same JAX step with ``objective="elbo"``, a lean JAX
  step without the trainer's metrics and non-finite guard (``--lean``; a
  diagnostic) and a 2048^2 float32 matmul (the machine's peak now). Every round
  runs one window of each, back to back, so that the load of other jobs falls
  on all alike; the numbers are medians over rounds, and ratios are medians of
  the per-round ratios. Also: compile time (lower + compile) of each JAX step
  and its FLOPs (XLA's cost analysis; for a step with oneDNN's convolutions,
  which it does not count, that of the same step with XLA's), hence the fraction of the matmul peak
  each framework achieves; and GECO's overhead over the ELBO step, from
  ``--geco_rounds`` further pairs of short GECO / ELBO windows. With
  ``--torch_compile``, every torch configuration also runs under
  ``torch.compile`` (reported beside the eager reference, with its compile time).
scaling
  ConvDraw's compile time and steps/s against T (``--scaling_steps``) and
  against the batch size (``--scaling_batches``), JAX beside the best torch
  configuration of ``compare``.
pipeline
  Batches/s of the input pipeline (``EpochBatcher`` and the ``Prefetcher``
  with the host -> device copy, as the trainer runs it by default; and
  ``DeviceEpochBatcher``, the gather from a copy on the device that
  ``config.data_on_device`` selects) at each model's batch size, against that
  model's step.
data_parallel
  Steps/s of ``--dp_model`` at its global batch over 1, 2, 4, 8 forced host
  devices (a subprocess with ``--xla_force_host_platform_device_count``). On
  a CPU this measures the overhead of splitting, not a speed-up. A config's
  ``'auto'`` convolutions run as XLA's there, on every device count.

Each model runs with its config's ``xla_flags`` (``configs/paper.py``: ConvDraw's
keep XLA:CPU's convolutions off YNNPACK), as ``experiments.main`` runs it: XLA
reads its flags once, when JAX starts, so a model whose flags this process
lacks is timed (``compare``, and ``scaling`` for ConvDraw) in a subprocess with
them; ``--noconfig_xla_flags`` times every model with this process's flags.

A window starts from the runner's initial state (parameters, optimiser and
GECO state restored outside the timing, so that every runner and every round
times the same stretch of training: the first steps on one fixed batch) and
runs steps for ``--seconds`` (at least one step), keeping one JAX step in
flight ahead of the host, as the trainer does; ``--rounds`` windows per runner
follow a warm-up of two steps. ``os.getloadavg()`` is recorded at the
start and end of every section: the machine is shared, and on 2 cores a load
above 2 means other jobs take part of it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

from absl import app
from absl import flags

from benchmarks import timing

_MODELS = flags.DEFINE_list("models", ["conv_vae", "convdraw", "vae_nvp"],
                            "Models to compare: conv_vae, convdraw, vae_nvp.")
_SECTIONS = flags.DEFINE_list("sections", ["compare", "scaling", "pipeline", "data_parallel"],
                              "Sections to run.")
_SECONDS, _ROUNDS, _JSON = timing.run_flags(
    __name__, seconds=2.0, rounds=7, json_path="step_time.json")
_TORCH, _TORCH_LAYOUTS, _TORCH_THREADS = timing.torch_flags(__name__)
_TORCH_DEVICE = flags.DEFINE_enum(
    "torch_device", "cpu", ["cpu", "cuda"],
    "Where the torch twins run. 'cuda': on the GPU, with TF32 matmuls and convolutions "
    "(torch.set_float32_matmul_precision('high')), as JAX computes float32 dots and "
    "convolutions on recent NVIDIA GPUs by default; --torch_threads is then moot.")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", False,
    "Also time every torch configuration with the twin under torch.compile (inductor, "
    "default mode; its compile time is the first step's). Reported beside the eager "
    "ones, which stay the reference (the issue's baseline is torch eager).")
_SIZE = flags.DEFINE_enum(
    "size", "cpu", ["cpu", "accelerator"],
    "Size of ConvDraw and VAE+NVP (configs/paper.py): 'cpu' presets or the paper-sized "
    "'accelerator' ones (batch 64). The conv VAE has one size.")
_SCALING_STEPS = flags.DEFINE_list("scaling_steps", ["4", "8", "16"], "ConvDraw T values.")
_SCALING_BATCHES = flags.DEFINE_list("scaling_batches", ["16", "32", "64"],
                                     "ConvDraw batch sizes (at T = 8).")
_GECO_ROUNDS = flags.DEFINE_integer(
    "geco_rounds", 20, "Extra interleaved GECO / ELBO window pairs for GECO's overhead.")
_GECO_SECONDS = flags.DEFINE_float("geco_seconds", 0.5, "Window length of those pairs.")
_LEAN = flags.DEFINE_bool("lean", True, "Also time the diagnostic lean JAX step.")
_RECURRENCE = flags.DEFINE_string("convdraw_recurrence", None,
                                  "ConvDraw's recurrence form (default: the preset's).")
_CONVOLUTIONS = flags.DEFINE_list(
    "convdraw_convolutions", [],
    "ConvDraw's convolutions (experiments.setup.MODEL_CONVOLUTIONS: auto, xla, onednn, "
    "onednn_winograd). The first replaces the config's ('auto') in every section; in "
    "'compare', each further one is timed as one more JAX runner in the same rounds "
    "(e.g. 'auto,xla').")
_VAE_CONVOLUTIONS = flags.DEFINE_list(
    "vae_convolutions", [],
    "The conv VAE's and VAE+NVP's convolutions (auto, xla, onednn), as "
    "--convdraw_convolutions is ConvDraw's: the first replaces the config's ('auto'), "
    "each further one is one more JAX runner in 'compare' (e.g. 'auto,xla').")


def _convdraw_forms_are_known(_) -> bool:
  from experiments.setup import MODEL_CONVOLUTIONS  # noqa: PLC0415
  from geco_jax.models.convdraw import RECURRENCES  # noqa: PLC0415

  for flag, model in ((_CONVOLUTIONS, "convdraw"), (_VAE_CONVOLUTIONS, "conv_vae")):
    allowed = MODEL_CONVOLUTIONS[model]
    if (any(c not in allowed for c in flag.value)
        or len(set(flag.value)) != len(flag.value)):
      raise flags.ValidationError(
          f"--{flag.name} takes distinct values among {', '.join(allowed)}; "
          f"got {','.join(flag.value)}.")
  if _RECURRENCE.value is not None and _RECURRENCE.value not in RECURRENCES:
    raise flags.ValidationError(
        f"--convdraw_recurrence must be one of {', '.join(RECURRENCES)}; got "
        f"{_RECURRENCE.value!r}.")
  return True


flags.register_multi_flags_validator(
    ["convdraw_convolutions", "vae_convolutions", "convdraw_recurrence"],
    _convdraw_forms_are_known)
_DP_MODEL = flags.DEFINE_string("dp_model", "conv_vae", "Model of the data_parallel section.")
_DP_DEVICES = flags.DEFINE_list("dp_devices", ["1", "2", "4", "8"], "Device counts.")
_DP_CHILD = flags.DEFINE_bool("data_parallel_child", False,
                              "Internal: run the data-parallel section in this process.")
_CONFIG_XLA_FLAGS = timing.shared_flag("config_xla_flags", lambda: flags.DEFINE_bool(
    "config_xla_flags", True,
    "Time each model with its config's xla_flags (as experiments.main runs it): a "
    "model whose flags are not in this process's $XLA_FLAGS runs in a subprocess."))


_MATMUL_SIZE = 2048


# ------------------------------------------------------------ timing ---

# Shared with the other benchmarks (benchmarks/timing.py).
_window = timing.window
Runner = timing.Runner
_interleave = timing.interleave
_paired_ratio = timing.paired_ratio
_load = timing.load


# ------------------------------------------------------------ JAX ---

def _config(name: str, batch_size: Optional[int] = None, objective: str = "geco",
            **model_overrides):
  """The experiment config each benchmark model comes from (CPU presets)."""
  from configs import convdraw_mnist
  from configs import default
  from configs import nvp_mnist

  if name == "conv_vae":
    config = default.get_config()
  else:
    config = {"convdraw": convdraw_mnist, "vae_nvp": nvp_mnist}[name].get_config(_SIZE.value)
  if batch_size is not None:
    config.batch_size = batch_size
  config.objective = objective
  if name == "convdraw" and _RECURRENCE.value:
    model_overrides.setdefault("recurrence", _RECURRENCE.value)
  convolutions = _convolutions_flag(name).value
  if convolutions:
    model_overrides.setdefault("convolutions", convolutions[0])
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def _convolutions_flag(name: str):
  """The flag that sets model ``name``'s convolutions."""
  return _CONVOLUTIONS if name == "convdraw" else _VAE_CONVOLUTIONS


def _data(images) -> dict:
  return {"train": {"image": images}, "test": {"image": images[:64]}}


class JaxStep:
  """The trainer's compiled step for ``config`` on ``devices``, compiled ahead of time.

  ``compiler_options``: XLA options for this compilation only (``DebugOptions``
  by name, as in ``$XLA_FLAGS`` without the dashes), on top of the process's
  flags; ``benchmarks.xla_options`` compares them in one process.
  """

  def __init__(self, config, images, devices, compiler_options: Optional[dict] = None):
    import jax

    from experiments import train

    self.experiment = train.Experiment(config, _data(images), devices)
    self.initial = self.experiment.initial_state()
    self._copy = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree),
                         out_shardings=self.experiment.replicated)
    self.state = self._copy(self.initial)
    self.batch = self.experiment.batch_at(0)
    start = time.perf_counter()
    self.compiled = self.experiment.step_fn.lower(self.state, self.batch).compile(
        compiler_options=compiler_options or None)
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    own = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's count for this program itself (custom calls count nothing).
    self.xla_flops = float(own.get("flops", float("nan"))) if own else float("nan")
    if getattr(self.experiment.model, "convolutions", "xla") != "xla":
      # XLA's cost analysis does not count custom calls (oneDNN's convolutions):
      # the FLOPs of the same step with XLA's convolutions, from its lowering
      # (within about 1% of the compiled program's count, uncompiled).
      twin = copy.deepcopy(config)
      twin.model.convolutions = "xla"
      cost = train.Experiment(twin, self.experiment.data, devices).step_fn.lower(
          self.state, self.batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    self.block = jax.block_until_ready

  def reset(self):
    """Back to the initial state (the step donates the state, so a copy of it)."""
    self.state = self._copy(self.initial)
    self.block(self.state)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics

  def runner(self, name: str) -> Runner:
    return Runner(name, self.step, self.block, setup=self.reset)


class LeanJaxStep(JaxStep):
  """Diagnostic: the same model, objective and optimiser as ``JaxStep``, without
  the trainer's extras (metrics, norms, the non-finite guard); state donated."""

  def __init__(self, config, images, devices):  # pylint: disable=super-init-not-called
    import jax
    import optax

    from experiments import setup
    from experiments import train

    experiment = train.Experiment(config, _data(images), devices)
    model, tx = experiment.model, experiment.tx
    loss_fn = setup.make_loss_fn(config, experiment.constraint_fn)
    uses_geco = experiment.uses_geco

    def step(params, opt_state, rng, batch):
      rng, step_rng = jax.random.split(rng)

      def objective(params):
        output = setup.apply_model(model, params["model"], batch, step_rng)
        loss, (constraint, _) = loss_fn(params["likelihood"], batch, output, opt_state, 0)
        return loss, constraint

      (loss, constraint), grads = jax.value_and_grad(objective, has_aux=True)(params)
      extra = {"constraint": constraint} if uses_geco else {}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, rng, loss

    state = experiment.initial_state()
    self.initial = (state.params, state.opt_state, state.rng)
    self._copy = jax.jit(lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree),
                         out_shardings=experiment.replicated)
    self.args = self._copy(self.initial)
    self.batch = experiment.batch_at(0)
    start = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
        *self.args, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = self.xla_flops = float("nan")
    self.block = jax.block_until_ready

  def reset(self):
    self.args = self._copy(self.initial)
    self.block(self.args)

  def step(self):
    *self.args, loss = self.compiled(*self.args, self.batch)
    return loss


def _matmul_runner() -> tuple[Runner, float]:
  """A runner of one 2048^2 float32 matmul, and its FLOPs."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (_MATMUL_SIZE, _MATMUL_SIZE), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return (Runner("matmul", lambda: matmul(a), jax.block_until_ready, seconds=0.5),
          2.0 * _MATMUL_SIZE ** 3)


# ------------------------------------------------------------ torch ---

def _import_torch():
  return timing.import_torch(_TORCH.value)


def _torch_threads() -> list[int]:
  if _TORCH_DEVICE.value == "cuda":  # one configuration: the host threads do not matter
    return [os.cpu_count()]
  return timing.thread_counts(_TORCH_THREADS.value)


def _torch_blocking(torch, step: Callable) -> tuple[Callable, Callable]:
  """``step`` and what to wait on it with, on ``--torch_device``.

  On the GPU torch returns before its kernels have run: the step records a CUDA
  event after itself and ``block`` waits for that event, which keeps one step in
  flight ahead of the host as ``_window`` does for JAX.
  """
  if _TORCH_DEVICE.value != "cuda":
    return step, lambda _: None

  def step_with_event():
    step()
    event = torch.cuda.Event()
    event.record()
    return event

  return step_with_event, lambda event: event.synchronize()


def torch_runner(torch, config, images, layout: str, threads: int,
                 compiled: bool = False) -> Runner:
  """``GecoStep`` of the torch twin of ``config``'s model, same batch and settings.

  ``compiled``: the twin under ``torch.compile``, compiled here (with ``threads``
  set: inductor's CPU kernels keep the thread count they were compiled with) by
  one step whose time is the runner's ``compile_s``; the state is restored after.
  """
  # The twin's GECO is the RE constraint with the plain (sgd) dual update, and
  # its ELBO has a fixed sigma: anything else would time a different objective
  # than the JAX step's.
  others = sorted(set(config.constraints.keys()) - {"re"})
  dual = (config.get("geco") or {}).get("dual", "sgd")
  if config.objective == "geco" and (others or dual != "sgd"):
    raise ValueError(
        "torch_runner's twin runs GECO with the RE constraint and the sgd dual "
        f"update only; this config has constraints {sorted(config.constraints.keys())} "
        f"and dual {dual!r}.")
  if config.objective not in ("geco", "elbo") or (
      config.objective == "elbo" and config.elbo.get("learn_sigma")):
    raise ValueError(
        "torch_runner's twin runs GECO or the ELBO with a fixed sigma only; this config "
        f"has objective {config.objective!r}"
        + (" with a learned sigma." if config.objective == "elbo" else "."))
  from benchmarks import torch_models
  from experiments import setup

  memory_format = {"nchw": torch.contiguous_format,
                   "channels_last": torch.channels_last}[layout]
  device = torch.device(_TORCH_DEVICE.value)
  torch.manual_seed(config.seed)
  kwargs = setup.model_kwargs(config, images.shape[1:])
  model = torch_models.MODELS[config.model.name](**kwargs).to(
      device=device, memory_format=memory_format)
  re = config.constraints.re
  step = torch_models.GecoStep(
      torch.compile(model) if compiled else model,
      learning_rate=config.optimizer.learning_rate, objective=config.objective,
      tolerance=re.tolerance, lambda_lr=re.get("lambda_lr", config.geco.lambda_lr),
      alpha=config.geco.alpha, lambda_init=config.geco.lambda_init,
      lambda_min=config.geco.lambda_min, lambda_max=config.geco.lambda_max,
      sigma=config.elbo.sigma)
  x = torch.from_numpy(images[:config.batch_size].transpose(0, 3, 1, 2).copy())
  x = x.to(device).contiguous(memory_format=memory_format)
  initial_model = copy.deepcopy(model.state_dict())
  initial_optimizer = copy.deepcopy(step.optimizer.state_dict())

  def setup_window():
    torch.set_num_threads(threads)
    model.load_state_dict(initial_model)
    step.optimizer.load_state_dict(initial_optimizer)
    step.reset_multiplier()

  step_fn, block = _torch_blocking(torch, lambda: step(x))
  name = f"torch {layout}/" + ("cuda" if _TORCH_DEVICE.value == "cuda" else f"{threads}t")
  runner = Runner(name + (" compiled" if compiled else ""), step_fn, block, setup=setup_window)
  runner.compile_s = None
  if compiled:
    setup_window()
    start = time.perf_counter()
    block(step_fn())
    runner.compile_s = time.perf_counter() - start
  return runner


def _torch_parameter_count(torch, config, images) -> int:
  from benchmarks import torch_models
  from experiments import setup

  model = torch_models.MODELS[config.model.name](**setup.model_kwargs(config,
                                                                       images.shape[1:]))
  return torch_models.num_parameters(model)


def _jax_parameter_count(step: JaxStep) -> int:
  import jax

  return sum(x.size for x in jax.tree_util.tree_leaves(step.state.params["model"]))


# ------------------------------------------------------------ sections ---

def compare(torch, images, devices, models) -> dict:
  """Section ``compare`` for ``models``: see the module docstring."""
  results = {}
  if not models:
    return results
  matmul, matmul_flops = _matmul_runner()
  for name in models:
    load_start = _load()
    config = _config(name)
    geco = JaxStep(config, images, devices)
    elbo = JaxStep(_config(name, objective="elbo"), images, devices)
    jax_geco, jax_elbo = geco.runner("jax geco"), elbo.runner("jax elbo")
    lean = LeanJaxStep(config, images, devices) if _LEAN.value else None
    lean_runners = [lean.runner("jax lean")] if lean else []
    variants = {}   # further --convdraw_convolutions (--vae_convolutions), one JAX runner each
    for convolutions in _convolutions_flag(name).value[1:]:
      variant = JaxStep(_config(name, convolutions=convolutions), images, devices)
      variants[convolutions] = (variant, variant.runner(f"jax geco {convolutions}"))
    variant_runners = [runner for _, runner in variants.values()]
    torch_runners = []
    if torch is not None:
      count = _torch_parameter_count(torch, config, images)
      if count != _jax_parameter_count(geco):
        raise AssertionError(f"{name}: torch twin has {count} parameters, the Flax "
                             f"model {_jax_parameter_count(geco)}.")
      torch_runners = [torch_runner(torch, config, images, layout, threads)
                       for threads in _torch_threads() for layout in _TORCH_LAYOUTS.value]
    compiled_runners = []
    if torch is not None and _TORCH_COMPILE.value:
      compiled_runners = [torch_runner(torch, config, images, layout, threads, compiled=True)
                          for threads in _torch_threads() for layout in _TORCH_LAYOUTS.value]
    matmul.rates = []
    _interleave([jax_geco, *variant_runners, *torch_runners, *compiled_runners, jax_elbo,
                 *lean_runners, matmul], _ROUNDS.value, _SECONDS.value)
    peak = matmul.median * matmul_flops
    # GECO's overhead is a few percent at most: many short GECO / ELBO window
    # pairs give its paired ratio a smaller spread than the rounds above.
    overhead_geco, overhead_elbo = geco.runner("jax geco"), elbo.runner("jax elbo")
    if _GECO_ROUNDS.value:
      _interleave([overhead_geco, overhead_elbo], _GECO_ROUNDS.value, _GECO_SECONDS.value)
    else:
      overhead_geco, overhead_elbo = jax_geco, jax_elbo
    ratios = sorted(g / e for g, e in zip(overhead_geco.rates, overhead_elbo.rates))
    entry = {
        "batch_size": config.batch_size,
        "parameters": _jax_parameter_count(geco),
        "jax_steps_per_s": jax_geco.median,
        "jax_windows": jax_geco.rates,
        "jax_compile_s": geco.compile_s,
        "jax_elbo_steps_per_s": jax_elbo.median,
        "jax_elbo_compile_s": elbo.compile_s,
        # Extra time per step of GECO over the ELBO step, paired by window.
        "geco_overhead": 1.0 / _paired_ratio(overhead_geco, overhead_elbo) - 1.0,
        "geco_overhead_pairs": len(ratios),
        "geco_overhead_interquartile": [1.0 / ratios[(3 * len(ratios)) // 4] - 1.0,
                                        1.0 / ratios[len(ratios) // 4] - 1.0],
        "geco_overhead_main_rounds": 1.0 / _paired_ratio(jax_geco, jax_elbo) - 1.0,
        "flops_per_step": geco.flops,
        "jax_elbo_flops_per_step": elbo.flops,
        "matmul_flops_per_s": peak,
        "matmul_flops_per_s_windows": [r * matmul_flops for r in matmul.rates],
        "jax_fraction_of_matmul_peak": geco.flops * jax_geco.median / peak,
        "torch": {r.name[len("torch "):]: {"steps_per_s": r.median, "windows": r.rates}
                  for r in torch_runners},
        "load_start": load_start, "load_end": _load(),
    }
    if lean:
      entry.update({"jax_lean_steps_per_s": lean_runners[0].median,
                    "jax_lean_compile_s": lean.compile_s,
                    "trainer_extras_overhead":
                        1.0 / _paired_ratio(jax_geco, lean_runners[0]) - 1.0})
    if torch_runners:
      best = max(torch_runners, key=lambda r: r.median)
      entry.update({
          "torch_best": best.name[len("torch "):],
          "torch_best_steps_per_s": best.median,
          "torch_fraction_of_matmul_peak": geco.flops * best.median / peak,
          "ratio_jax_to_torch_best": _paired_ratio(jax_geco, best),
          "ratio_jax_to_torch": {r.name[len("torch "):]: _paired_ratio(jax_geco, r)
                                 for r in torch_runners},
      })
    if compiled_runners:
      best = max(compiled_runners, key=lambda r: r.median)
      entry.update({
          "torch_compiled": {r.name[len("torch "):-len(" compiled")]: {
              "steps_per_s": r.median, "windows": r.rates, "compile_s": r.compile_s}
              for r in compiled_runners},
          "torch_compiled_best": best.name[len("torch "):-len(" compiled")],
          "torch_compiled_best_steps_per_s": best.median,
          "ratio_jax_to_torch_compiled_best": _paired_ratio(jax_geco, best),
      })
      if torch_runners:
        eager = max(torch_runners, key=lambda r: r.median)
        entry["ratio_torch_compiled_to_eager_best"] = _paired_ratio(best, eager)
    if "convolutions" in config.model:   # the config's value, and what it ran ('auto' resolved)
      entry["config_convolutions"] = config.model.get("convolutions", "xla")
      entry["convolutions"] = geco.experiment.model.convolutions
    if variants:
      best = max(torch_runners, key=lambda r: r.median) if torch_runners else None
      entry["jax_variants"] = {
          convolutions: {
              "steps_per_s": runner.median, "windows": runner.rates,
              "compile_s": step.compile_s,
              "ratio_to_jax": _paired_ratio(runner, jax_geco),
              **({"ratio_to_torch_best": _paired_ratio(runner, best)} if best else {})}
          for convolutions, (step, runner) in variants.items()}
    entry["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    results[name] = entry
  return results


def scaling(torch, images, devices, best_torch: Optional[str]) -> dict:
  """Section ``scaling``: ConvDraw against T and against the batch size."""
  points = [(int(t), 32) for t in _SCALING_STEPS.value]
  points += [(8, int(b)) for b in _SCALING_BATCHES.value if (8, int(b)) not in points]
  rows = []
  for num_steps, batch_size in points:
    load_start = _load()
    config = _config("convdraw", batch_size, num_steps=num_steps)
    step = JaxStep(config, images, devices)
    runners = [step.runner("jax")]
    if torch is not None and best_torch:
      layout, where = best_torch.split("/")
      threads = int(where[:-1]) if where.endswith("t") else os.cpu_count()
      runners.append(torch_runner(torch, config, images, layout, threads))
    _interleave(runners, max(1, _ROUNDS.value // 2 + 1), _SECONDS.value)
    row = {"num_steps": num_steps, "batch_size": batch_size, "jax_compile_s": step.compile_s,
           "jax_steps_per_s": runners[0].median, "flops_per_step": step.flops,
           "load_start": load_start, "load_end": _load()}
    if len(runners) > 1:
      row.update({"torch": best_torch, "torch_steps_per_s": runners[1].median,
                  "ratio_jax_to_torch": _paired_ratio(runners[0], runners[1])})
    rows.append(row)
    del step
  return {"rows": rows}


def pipeline(images, devices, step_rates: dict) -> dict:
  """Section ``pipeline``: batches/s of the input pipeline against each step."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec

  from benchmarks import input_pipeline
  from experiments import train

  sharding = NamedSharding(train.make_mesh(devices), PartitionSpec("data"))

  def device_batch(batch):
    """What ``Experiment.device_batch`` does in one process, waited for."""
    return jax.block_until_ready(
        {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()})

  load_start = _load()
  out = {"by_model": {}}
  by_batch = {}
  for name in _MODELS.value:
    batch_size = _config(name).batch_size
    if batch_size not in by_batch:
      by_batch[batch_size] = input_pipeline.pipeline_rates(
          images, batch_size, _SECONDS.value, transform=device_batch, sharding=sharding)
    rates = by_batch[batch_size]
    entry = {"batch_size": batch_size, **rates}
    if name in step_rates:
      entry["jax_steps_per_s"] = step_rates[name]
      entry["ratio_pipeline_to_step"] = rates["prefetcher_batches_per_s"] / step_rates[name]
      entry["ratio_device_batches_to_step"] = (rates["device_batches_per_s"]
                                               / step_rates[name])
    out["by_model"][name] = entry
  if step_rates:
    fastest = max(step_rates, key=step_rates.get)
    out["fastest_step"] = fastest
    out["ratio_pipeline_to_fastest_step"] = out["by_model"][fastest]["ratio_pipeline_to_step"]
    out["ratio_device_batches_to_fastest_step"] = (
        out["by_model"][fastest]["ratio_device_batches_to_step"])
  out.update({"load_start": load_start, "load_end": _load()})
  return out


def data_parallel_child(images) -> dict:
  """Runs in a process with forced host devices: steps/s per device count."""
  import jax

  rows = []
  counts = [int(n) for n in _DP_DEVICES.value if int(n) <= len(jax.devices())]
  config = _config(_DP_MODEL.value)
  if config.model.get("convolutions") == "auto":
    # 'auto' picks oneDNN's convolutions on one device and XLA's on several:
    # every row runs XLA's, so that the rows differ in the split alone.
    config.model.convolutions = "xla"
  steps = {n: JaxStep(config, images, jax.devices()[:n]) for n in counts}
  runners = [steps[n].runner(f"{n} devices") for n in counts]
  load_start = _load()
  _interleave(runners, _ROUNDS.value, _SECONDS.value)
  for n, runner in zip(counts, runners):
    rows.append({"devices": n, "steps_per_s": runner.median,
                 "compile_s": steps[n].compile_s,
                 "relative_to_1": _paired_ratio(runner, runners[0])})
  return {"model": _DP_MODEL.value, "global_batch_size": config.batch_size, "rows": rows,
          "load_start": load_start, "load_end": _load()}


def data_parallel() -> dict:
  """Section ``data_parallel``, in a subprocess that sees 8 host devices."""
  most = max(int(n) for n in _DP_DEVICES.value)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={most}").strip()
  args = [sys.executable, "-m", "benchmarks.step_time", "--data_parallel_child",
          f"--dp_model={_DP_MODEL.value}", f"--dp_devices={','.join(_DP_DEVICES.value)}",
          f"--seconds={_SECONDS.value}", f"--rounds={_ROUNDS.value}", "--json="]
  done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith("DATA_PARALLEL_JSON ")]
  if done.returncode or not lines:
    raise RuntimeError(f"data-parallel subprocess failed:\n{done.stderr[-3000:]}")
  return json.loads(lines[-1][len("DATA_PARALLEL_JSON "):])


# ------------------------------------------------------------ report ---

def _machine(torch) -> dict:
  import jax

  return {"cpu": timing.cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
          "torch": torch.__version__ if torch is not None else None,
          "torch_device": (torch.cuda.get_device_name() if torch is not None
                           and _TORCH_DEVICE.value == "cuda" else "cpu"),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _fmt(value, spec=".2f") -> str:
  return "-" if value is None else format(value, spec)


def print_report(results: dict) -> None:
  m = results["machine"]
  print(f"\n{m['cpu']}, {m['cores']} cores; jax {m['jax']} ({m['backend']}: "
        f"{m.get('device_kind', '-')}), torch {m['torch']} ({m.get('torch_device', 'cpu')});"
        f" XLA_FLAGS={m['xla_flags']!r}")
  print(f"load average (1, 5, 15 min): start {results['load_start']}, "
        f"end {results['load_end']}")
  if "compare" in results:
    print("\nTraining steps/s (median of windows; ratios: median of per-round ratios)")
    header = (f"{'model':9s} {'batch':>5s} {'JAX':>7s} {'torch best':>11s} {'(config)':18s}"
              f" {'JAX/torch':>9s} {'GECO ovh':>8s} {'compile s':>9s} {'GFLOP':>7s}"
              f" {'JAX %pk':>7s} {'tch %pk':>7s} {'matmul GF/s':>11s}  load start -> end")
    print(header)
    for name, e in results["compare"].items():
      print(f"{name:9s} {e['batch_size']:5d} {e['jax_steps_per_s']:7.2f}"
            f" {_fmt(e.get('torch_best_steps_per_s')):>11s} {e.get('torch_best', '-'):18s}"
            f" {_fmt(e.get('ratio_jax_to_torch_best')):>9s} {e['geco_overhead']:+8.1%}"
            f" {e['jax_compile_s']:9.1f} {e['flops_per_step'] / 1e9:7.2f}"
            f" {e['jax_fraction_of_matmul_peak']:7.1%}"
            f" {_fmt(e.get('torch_fraction_of_matmul_peak'), '.1%'):>7s}"
            f" {e['matmul_flops_per_s'] / 1e9:11.0f}  {e['load_start'][0]} -> {e['load_end'][0]}")
    if m["backend"] != "cpu":
      print("  (on a GPU, XLA's cost analysis leaves out library calls such as cuDNN's "
            "convolutions: GFLOP and %pk undercount; docs/performance.md uses CPU counts)")
    for name, e in results["compare"].items():
      low, high = e["geco_overhead_interquartile"]
      if "convolutions" in e:
        print(f"  {name}: JAX ran convolutions={e['convolutions']!r} (the config's "
              f"{e.get('config_convolutions', e['convolutions'])!r})")
      print(f"  {name}: torch " + (", ".join(
          f"{k} {v['steps_per_s']:.2f}" for k, v in e["torch"].items()) or "-")
              + f"; GECO overhead {e['geco_overhead']:+.1%} (interquartile"
              f" {low:+.1%}..{high:+.1%}, {e['geco_overhead_pairs']} pairs)"
              + f"; JAX elbo step {e['jax_elbo_steps_per_s']:.2f}"
              f" (compile {e['jax_elbo_compile_s']:.1f} s)"
              + (f"; JAX lean step {e['jax_lean_steps_per_s']:.2f} (trainer extras"
                 f" {e['trainer_extras_overhead']:+.1%})" if "jax_lean_steps_per_s" in e else "")
              + f"; XLA_FLAGS={e.get('xla_flags', '')!r}")
      for convolutions, v in e.get("jax_variants", {}).items():
        print(f"  {name}: JAX with convolutions={convolutions!r} {v['steps_per_s']:.2f}"
              f" (compile {v['compile_s']:.1f} s); / JAX with {e['convolutions']!r}"
              f" {v['ratio_to_jax']:.3f}"
              + (f"; / torch best {v['ratio_to_torch_best']:.2f}"
                 if "ratio_to_torch_best" in v else ""))
      if "torch_compiled" in e:
        print(f"  {name}: torch.compile " + ", ".join(
            f"{k} {v['steps_per_s']:.2f} (compile {v['compile_s']:.1f} s)"
            for k, v in e["torch_compiled"].items())
              + f"; JAX / compiled best {e['ratio_jax_to_torch_compiled_best']:.2f}"
              + (f"; compiled / eager best {e['ratio_torch_compiled_to_eager_best']:.2f}"
                 if "ratio_torch_compiled_to_eager_best" in e else ""))
  if "scaling" in results:
    print(f"\nConvDraw (mnist_{results['settings']['size']}) against T and batch size")
    print(f"{'T':>3s} {'batch':>5s} {'compile s':>9s} {'JAX':>7s} {'torch':>7s} "
          f"{'JAX/torch':>9s} {'GFLOP':>7s}  load")
    for r in results["scaling"]["rows"]:
      print(f"{r['num_steps']:3d} {r['batch_size']:5d} {r['jax_compile_s']:9.1f}"
            f" {r['jax_steps_per_s']:7.2f} {_fmt(r.get('torch_steps_per_s')):>7s}"
            f" {_fmt(r.get('ratio_jax_to_torch')):>9s} {r['flops_per_step'] / 1e9:7.2f}"
            f"  {r['load_start'][0]} -> {r['load_end'][0]}")
  if "pipeline" in results:
    p = results["pipeline"]
    print("\nInput pipeline (batches/s) against the JAX step it feeds")
    for name, e in p["by_model"].items():
      print(f"{name:9s} batch {e['batch_size']:3d}: batcher {e['batcher_batches_per_s']:.0f},"
            f" prefetcher+device copy {e['prefetcher_batches_per_s']:.0f},"
            f" on-device gather {e['device_batches_per_s']:.0f},"
            f" step {_fmt(e.get('jax_steps_per_s'))}, ratio"
            f" {_fmt(e.get('ratio_pipeline_to_step'), '.0f')}x"
            f" ({_fmt(e.get('ratio_device_batches_to_step'), '.0f')}x on device)")
  if "data_parallel" in results:
    d = results["data_parallel"]
    print(f"\nData parallel: {d['model']}, global batch {d['global_batch_size']},"
          f" forced host devices (load {d['load_start'][0]} -> {d['load_end'][0]})")
    for r in d["rows"]:
      print(f"{r['devices']:2d} devices: {r['steps_per_s']:7.2f} steps/s"
            f" ({r['relative_to_1']:.2f}x of 1), compile {r['compile_s']:.1f} s")


def _config_xla_flags(name: str) -> str:
  return _config(name).get("xla_flags", "")


def _sections_with_own_flags(results: dict) -> list[str]:
  """Runs, in subprocesses, the models whose config's XLA flags this process lacks.

  ``compare`` for those models, and ``scaling`` (ConvDraw) when ConvDraw is one
  of them, each in a fresh process with ``$XLA_FLAGS`` = the config's flags +
  the environment's (XLA reads them once, when JAX starts). Fills ``results``
  and returns the models left to this process.
  """
  current = os.environ.get("XLA_FLAGS", "").split()
  compared = _MODELS.value if "compare" in _SECTIONS.value else []
  scaled = ["convdraw"] if "scaling" in _SECTIONS.value else []
  groups: dict[str, list[str]] = {}
  for name in dict.fromkeys(compared + scaled):
    wanted = _config_xla_flags(name)
    if wanted and not all(f in current for f in wanted.split()):
      groups.setdefault(wanted, []).append(name)
  for wanted, names in groups.items():
    own = (["compare"] if set(names) & set(compared) else []) + (
        ["scaling"] if "convdraw" in names and scaled else [])
    handle, out = tempfile.mkstemp(prefix="step_time_", suffix=".json")
    os.close(handle)
    env = dict(os.environ, XLA_FLAGS=" ".join(wanted.split() + current))
    models = [n for n in names if n in compared] or names
    args = [sys.executable, "-m", "benchmarks.step_time", *sys.argv[1:],
            f"--models={','.join(models)}", f"--sections={','.join(own)}",
            f"--json={out}", "--noconfig_xla_flags"]
    print(f"[{', '.join(names)}: {' '.join(own)} in a subprocess with XLA_FLAGS="
          f"{env['XLA_FLAGS']!r}]", flush=True)
    done = subprocess.run(args, env=env, check=False)
    try:
      if done.returncode:
        raise RuntimeError(f"the subprocess for {names} failed (exit {done.returncode}).")
      with open(out) as f:
        child = json.load(f)
    finally:
      os.remove(out)
    for name in names:
      if name in child.get("compare", {}):
        results.setdefault("compare", {})[name] = child["compare"][name]
    if "scaling" in child:
      results["scaling"] = dict(child["scaling"], xla_flags=env["XLA_FLAGS"])
  return [n for n in compared if not any(n in g for g in groups.values())]


def main(argv):
  del argv
  from benchmarks import input_pipeline

  images, source = input_pipeline.mnist_shaped_images()
  if _DP_CHILD.value:
    print("DATA_PARALLEL_JSON " + json.dumps(data_parallel_child(images)))
    return
  import jax

  torch = _import_torch()
  if torch is not None:
    torch.set_num_threads(os.cpu_count())
    if _TORCH_DEVICE.value == "cuda":
      if not torch.cuda.is_available():
        raise app.UsageError("--torch_device=cuda, but torch sees no CUDA device.")
      torch.set_float32_matmul_precision("high")  # TF32, as JAX's default on the GPU
  devices = jax.devices()[:1]
  results = {"machine": _machine(torch), "data": source, "load_start": _load(),
             "settings": {"seconds": _SECONDS.value, "rounds": _ROUNDS.value,
                          "models": _MODELS.value, "sections": _SECTIONS.value,
                          "size": _SIZE.value, "torch_device": _TORCH_DEVICE.value}}
  sections = _SECTIONS.value
  here = _MODELS.value
  if _CONFIG_XLA_FLAGS.value:
    here = _sections_with_own_flags(results)
  if "compare" in sections:
    compared = results.pop("compare", {})
    results["compare"] = compare(torch, images, devices, here)
    results["compare"].update(compared)
    results["compare"] = {n: results["compare"][n] for n in _MODELS.value}
  if "scaling" in sections and "scaling" not in results:
    best = results.get("compare", {}).get("convdraw", {}).get("torch_best")
    if best is None and torch is not None:
      best = f"{_TORCH_LAYOUTS.value[0]}/" + (
          "cuda" if _TORCH_DEVICE.value == "cuda" else f"{_torch_threads()[0]}t")
    results["scaling"] = scaling(torch, images, devices, best)
  if "pipeline" in sections:
    rates = {k: v["jax_steps_per_s"] for k, v in results.get("compare", {}).items()}
    results["pipeline"] = pipeline(images, devices, rates)
  if "data_parallel" in sections:
    results["data_parallel"] = data_parallel()
  results["load_end"] = _load()
  print_report(results)
  timing.write_results(_JSON.value, results)


if __name__ == "__main__":
  app.run(main)
