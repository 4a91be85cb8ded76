"""benchmarks/: the PyTorch twins are the same models, and step_time runs end to end.

The twins need torch (the ``bench`` extra); those tests are skipped without it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import convdraw_mnist
from configs import default
from configs import nvp_mnist
from experiments import setup
from geco_jax.ops import onednn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = {"conv_vae": default, "convdraw": convdraw_mnist, "vae_nvp": nvp_mnist}


def _images(batch=2):
  return np.random.default_rng(0).random((batch, 28, 28, 1), np.float32)


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_torch_twins_have_the_flax_parameter_counts(name):
  pytest.importorskip("torch")
  from benchmarks import torch_models

  config = _CONFIGS[name].get_config()
  model = setup.make_model(config, (28, 28, 1))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(),
                          jax.random.PRNGKey(1))
  twin = torch_models.MODELS[name](**setup.model_kwargs(config, (28, 28, 1)))
  flax_count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
  assert torch_models.num_parameters(twin) == flax_count


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_torch_twins_compute_the_flax_function(name):
  """With the Flax parameters and the same noise, the same reconstruction and KL."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_models

  config = _CONFIGS[name].get_config()
  if name == "convdraw":
    config.model.num_steps = 3   # every step runs the same layers; fewer compile faster
  model = setup.make_model(config, (28, 28, 1))
  x = _images()
  rng = jax.random.PRNGKey(2)

  params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, jax.random.PRNGKey(1)))(x)
  # Flax initialises biases (and VAE+NVP's coupling outputs) to zero, which
  # would hide a twin that drops one (e.g. the prior's bias, the prior itself
  # at t = 1) or the layers before it: every parameter perturbed instead.
  perturb_rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + (0.1 if getattr(path[-1], "key", None) == "bias" else 0.02)
      * perturb_rng.standard_normal(leaf.shape, np.float32), params)
  out = jax.jit(lambda params, x: model.apply(params, x, rng))(params, x)
  kwargs = setup.model_kwargs(config, (28, 28, 1))
  # The noise each Flax model draws from ``rng``, in torch's layout.
  if name == "conv_vae":
    noise = np.asarray(jax.random.normal(rng, (len(x), kwargs["latent_size"])))
  elif name == "vae_nvp":
    noise = np.asarray(jax.random.normal(rng, (len(x), 1, kwargs["latent_size"])))[:, 0]
  else:
    noise = np.asarray(jax.random.normal(
        rng, (kwargs["num_steps"], len(x), 14, 14, kwargs["latent_channels"])))
    noise = noise.transpose(0, 1, 4, 2, 3)
  # ConvDraw's twin skips what the Flax model skips (lever 14), or not.
  for extra in ([{"skip_known": True}, {"skip_known": False}] if name == "convdraw"
                else [{}]):
    twin = torch_models.MODELS[name](**kwargs, **extra)
    torch_models.load_flax_params(twin, params["params"])
    for memory_format in (torch.contiguous_format, torch.channels_last):
      twin = twin.to(memory_format=memory_format)
      images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
          memory_format=memory_format)
      with torch.no_grad():
        reconstruction, kl = twin(images, torch.from_numpy(noise.copy()))
      np.testing.assert_allclose(reconstruction.numpy().transpose(0, 2, 3, 1),
                                 np.asarray(out.reconstruction), atol=1e-5)
      np.testing.assert_allclose(kl.numpy(), np.asarray(out.kl), rtol=1e-4, atol=1e-4)


def test_torch_geco_step_follows_geco_jax():
  """GecoStep's loss, moving average and multiplier are geco_jax's, step by step."""
  torch = pytest.importorskip("torch")
  import geco_jax
  from benchmarks import torch_models

  kwargs = dict(lambda_lr=0.05, alpha=0.9, lambda_init=2.0, lambda_min=1e-3,
                lambda_max=50.0)
  step = torch_models.GecoStep(torch.nn.Linear(1, 1), learning_rate=1e-3, **kwargs)
  tx = geco_jax.geco(lambda_lr=kwargs["lambda_lr"], alpha=kwargs["alpha"],
                     lambda_init={"re": kwargs["lambda_init"]},
                     lambda_min=kwargs["lambda_min"], lambda_max=kwargs["lambda_max"])
  opt_state = tx.init({})
  for kl, constraint in [(3.0, 40.0), (2.5, 10.0), (2.0, -30.0), (1.0, 60.0)]:
    loss = step.lagrangian(torch.tensor(kl), torch.tensor(constraint))
    expected = geco_jax.lagrangian(kl, {"re": constraint}, opt_state)
    step.update_multiplier()
    _, opt_state = tx.update({}, opt_state, constraint={"re": constraint})
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(step.lagrange_multiplier),
                               float(geco_jax.lagrange_multiplier(opt_state)["re"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(step.constraint_ma),
                               float(geco_jax.constraint_moving_average(opt_state)["re"]),
                               rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    ("constraint", "RE constraint and the sgd dual"),
    ("dual", "RE constraint and the sgd dual"),
    ("learned sigma", "with a learned sigma"),
    ("annealed sigma", "objective 'elbo_annealed'")])
def test_torch_runner_refuses_what_its_twin_does_not_run(change, message):
  """The twin runs GECO (RE, sgd dual) or a fixed-sigma ELBO: else an error, not a silent twin."""
  torch = pytest.importorskip("torch")
  import ml_collections

  from benchmarks import step_time

  config = default.get_config()
  if change == "constraint":
    config.constraints.fre = ml_collections.ConfigDict({"tolerance": 0.1})
  elif change == "dual":
    config.geco.dual = "pi"
  elif change == "learned sigma":
    config.objective, config.elbo.learn_sigma = "elbo", True
  else:
    config.objective = "elbo_annealed"
  with pytest.raises(ValueError, match=message):
    step_time.torch_runner(torch, config, _images(64), "nchw", 1)


@pytest.mark.slow   # about 30 s: a fresh process compiles and times the conv VAE
def test_step_time_cli_writes_the_results(tmp_path):
  """Tiny settings, end to end in a fresh process (JAX only when torch is absent)."""
  try:
    import torch  # noqa: F401  pylint: disable=unused-import
    has_torch = True
  except ImportError:
    has_torch = False
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "step_time.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", "--models=conv_vae",
       "--sections=compare,pipeline", "--seconds=0.05", "--rounds=1",
       "--torch_layouts=nchw", "--torch_threads=1", "--nolean", "--geco_rounds=2",
       "--geco_seconds=0.05", f"--json={out}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert {"machine", "load_start", "load_end", "compare", "pipeline"} <= set(results)
  entry = results["compare"]["conv_vae"]
  for key in ("jax_steps_per_s", "jax_compile_s", "jax_elbo_steps_per_s", "geco_overhead",
              "geco_overhead_pairs",
              "flops_per_step", "matmul_flops_per_s", "jax_fraction_of_matmul_peak",
              "load_start", "load_end"):
    assert key in entry, key
  assert entry["jax_steps_per_s"] > 0 and entry["flops_per_step"] > 0
  assert len(results["load_start"]) == 3
  if has_torch:
    assert entry["torch_best"] == "nchw/1t"
    assert entry["torch_best_steps_per_s"] > 0 and entry["ratio_jax_to_torch_best"] > 0
  else:
    assert entry["torch"] == {}
  assert results["pipeline"]["by_model"]["conv_vae"]["ratio_pipeline_to_step"] > 0
  assert results["pipeline"]["by_model"]["conv_vae"]["ratio_device_batches_to_step"] > 0
  assert "JAX/torch" in done.stdout


@pytest.mark.slow   # about a minute: inductor compiles the twin
def test_step_time_times_torch_compile_beside_eager(tmp_path):
  pytest.importorskip("torch")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "step_time.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", "--models=conv_vae",
       "--sections=compare", "--seconds=0.05", "--rounds=1", "--torch_layouts=nchw",
       "--torch_threads=1", "--nolean", "--geco_rounds=0", "--torch_compile",
       f"--json={out}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  entry = json.loads(out.read_text())["compare"]["conv_vae"]
  assert entry["torch_best"] == "nchw/1t"                 # eager stays the reference
  assert set(entry["torch_compiled"]) == {"nchw/1t"}
  compiled = entry["torch_compiled"]["nchw/1t"]
  assert compiled["steps_per_s"] > 0 and compiled["compile_s"] > 0
  assert entry["ratio_jax_to_torch_compiled_best"] > 0
  assert entry["ratio_torch_compiled_to_eager_best"] > 0
  assert "torch.compile nchw/1t" in done.stdout


def _python(script: str, timeout: int = 120) -> str:
  """``script`` run by a fresh interpreter at the repository root: its standard output."""
  done = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def test_step_time_size_flag_selects_the_accelerator_presets():
  script = ("from absl import flags; from benchmarks import step_time; "
            "flags.FLAGS(['x', '--size=accelerator']); "
            "print([(step_time._config(n).model.get('preset'), step_time._config(n).batch_size)"
            " for n in ('conv_vae', 'convdraw', 'vae_nvp')])")
  assert _python(script).strip() == ("[(None, 64), ('mnist_accelerator', 64), "
                                 "('accelerator', 64)]")


def test_step_time_on_cuda_without_a_gpu_is_one_clear_error():
  torch = pytest.importorskip("torch")
  if torch.cuda.is_available():
    pytest.skip("this machine has a CUDA device")
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", "--torch_device=cuda", "--torch=on",
       "--json="], cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1] == (
      "--torch_device=cuda, but torch sees no CUDA device.")


@pytest.mark.parametrize("model, fast, uncounted", [
    ("convdraw", "onednn_winograd", 0.2), ("conv_vae", "onednn", 0.5)])
def test_step_time_counts_the_flops_of_onednns_convolutions(model, fast, uncounted):
  """XLA's cost analysis skips custom calls: a oneDNN step counts its XLA twin's FLOPs.

  ``xla_flops`` keeps XLA's own count (convdraw_parts compares its programs by it).
  The config's 'auto' runs oneDNN's convolutions on one CPU device.
  """
  if not onednn.available()[0]:
    pytest.skip("oneDNN unavailable")
  extra = ", num_steps=2" if model == "convdraw" else ""
  script = (
      "import jax, numpy as np; from absl import flags; from benchmarks import step_time\n"
      "flags.FLAGS(['x'])\n"
      "images = np.random.default_rng(0).random((8, 28, 28, 1), np.float32)\n"
      "for conv in ('auto', 'xla'):\n"
      f"  step = step_time.JaxStep(step_time._config({model!r}, batch_size=8{extra},"
      " convolutions=conv), images, jax.devices()[:1])\n"
      "  cost = step.compiled.cost_analysis()\n"
      "  cost = cost[0] if isinstance(cost, (list, tuple)) else cost\n"
      "  assert step.xla_flops == cost['flops']\n"
      "  print(step.experiment.model.convolutions, step.flops, step.xla_flops)\n")
  (chosen, fast_flops, fast_xla_count), (xla, xla_flops, _) = [
      line.split() for line in _python(script, timeout=300).strip().splitlines()[-2:]]
  assert (chosen, xla) == (fast, "xla")
  assert float(fast_xla_count) < uncounted * float(xla_flops)   # the custom calls uncounted
  assert abs(float(fast_flops) / float(xla_flops) - 1) < 0.03


@pytest.mark.parametrize("flag, message", [
    ("--convdraw_convolutions=xla,onedn", "--convdraw_convolutions takes distinct values"),
    ("--convdraw_convolutions=xla,xla", "--convdraw_convolutions takes distinct values"),
    ("--convdraw_recurrence=rolled", "--convdraw_recurrence must be one of"),
    ("--vae_convolutions=auto,onednn_winograd",
     "--vae_convolutions takes distinct values among auto, xla, onednn"),
])
def test_step_time_rejects_unknown_convdraw_forms_before_timing(flag, message):
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", flag, "--torch=off", "--json="],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert "Flags parsing error: " in done.stderr and message in done.stderr
  assert "Training steps/s" not in done.stdout


def test_conv_ops_times_convdraws_own_convolutions():
  """benchmarks.conv_ops's shapes are the kernels of the model's step t >= 2."""
  from benchmarks import conv_ops
  from geco_jax.models import convdraw

  preset = convdraw.convdraw_preset("mnist_cpu")
  model = convdraw.ConvDraw(**preset)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((2, 28, 28, 1), np.float32), jax.random.key(1))
  step = params["params"]["step"]
  kernels = {"encoder gates": step["encoder"]["gates"]["kernel"].shape,
             "decoder gates": step["decoder"]["gates"]["kernel"].shape,
             "posterior": step["posterior"]["kernel"].shape,
             "prior": step["prior"]["kernel"].shape}
  convs = {c["name"]: c for c in conv_ops.convolutions("mnist_cpu", 32)}
  assert set(convs) == set(kernels)
  for name, (k, _, cin, cout) in kernels.items():
    c = convs[name]
    assert (c["kernel"], c["out_channels"], c["batch"], c["height"]) == (k, cout, 32, 14)
    # The encoder's share of the read of x is convolved once, before the loop.
    assert c["in_channels"] == cin - (preset["read_channels"] if name == "encoder gates" else 0)
  assert conv_ops.flops(convs["prior"]) == 2 * 32 * 14 * 14 * 9 * 32 * 16


def test_conv_ops_computes_the_three_operations():
  """Forward, input and kernel gradient against sums written out in numpy (and torch's)."""
  from benchmarks import conv_ops

  conv = dict(name="c", batch=2, height=5, width=4, kernel=3, in_channels=3, out_channels=2)
  x, kernel, dy = conv_ops._arrays(conv)   # pylint: disable=protected-access
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = np.stack([np.stack([padded[:, i:i + 5, j:j + 4] for j in range(3)], 3)
                      for i in range(3)], 3)                  # [n, h, w, ki, kj, cin]
  expected = {
      "forward": np.einsum("nhwijc,ijcf->nhwf", windows, kernel),
      "kernel gradient": np.einsum("nhwijc,nhwf->ijcf", windows, dy),
  }
  # dx[n, p, q, c] = sum over the outputs that read x[n, p, q]: the transposed sum.
  dx = np.zeros((2, 7, 6, 3))
  for i in range(3):
    for j in range(3):
      dx[:, i:i + 5, j:j + 4] += np.einsum("nhwf,cf->nhwc", dy, kernel[i, j])
  expected["input gradient"] = dx[:, 1:6, 1:5]
  from geco_jax.ops import onednn
  algorithms = [None] + (list(onednn.ALGORITHMS) if onednn.available()[0] else [])
  for algorithm in algorithms:
    ops = conv_ops.jax_operations(conv, algorithm)
    for op in conv_ops.OPERATIONS:
      fn, args = ops[op]
      np.testing.assert_allclose(np.asarray(fn(*args)), expected[op], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{algorithm} {op}")
  torch = pytest.importorskip("torch")
  for layout in ("nchw", "channels_last"):
    for op, (fn, axes) in conv_ops.torch_operations(torch, conv, layout).items():
      np.testing.assert_allclose(fn().permute(*axes).numpy(), expected[op],
                                 rtol=1e-5, atol=1e-5)


def test_conv_ops_cli_writes_the_results(tmp_path):
  """Tiny settings, end to end in a fresh process, with ConvDraw's XLA flags."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "conv_ops.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.conv_ops", "--batch=2", "--seconds=0.02",
       "--rounds=1", "--torch_layouts=nchw", "--torch_threads=1", f"--json={out}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results["machine"]["xla_flags"] == convdraw_mnist.get_config().xla_flags
  assert [c["name"] for c in results["convolutions"]] == [
      "encoder gates", "decoder gates", "posterior", "prior"]
  for c in results["convolutions"]:
    for op in ("forward", "input gradient", "kernel gradient"):
      entry = c["operations"][op]
      assert entry["jax_ms"] > 0 and entry["jax_gflops_per_s"] > 0
      if "torch_best" in entry:
        assert entry["torch_best"] == "nchw/1t"
        assert entry["max_relative_difference"] < 1e-4
  assert results["summary"]["jax_ms_per_step"] > 0
  assert "Per training step" in done.stdout


def test_conv_ops_times_onednns_algorithms_too(tmp_path):
  from geco_jax.ops import onednn

  if not onednn.available()[0]:
    pytest.skip("oneDNN unavailable")
  out = tmp_path / "conv_ops.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.conv_ops", "--batch=2", "--seconds=0.02",
       "--rounds=1", "--torch=off", "--onednn=direct,winograd", f"--json={out}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  for c in results["convolutions"]:
    for entry in c["operations"].values():
      assert sorted(entry["onednn"]) == ["direct", "winograd"]
      for timed in entry["onednn"].values():
        assert timed["ms"] > 0 and timed["max_relative_difference_to_xla"] < 1e-4
  assert sorted(results["summary"]["onednn_ms_per_step"]) == ["direct", "winograd"]
  assert "onednn winograd:" in done.stdout


@pytest.mark.parametrize("flag, message", [
    ("--onednn=direct,fft", "--onednn takes distinct values"),   # an unknown algorithm
    ("--preset=mnist_gpu", "--preset must be one of"),            # an unknown preset
])
def test_conv_ops_rejects_bad_flags(flag, message):
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.conv_ops", flag, "--json="],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert message in done.stderr.strip().splitlines()[-1]


def test_convdraw_noise_generators_draw_standard_normals():
  """Lever 36's variants: deterministic in the key, the right shape, N(0, 1) but 'zeros'."""
  from benchmarks import convdraw_noise

  generators = convdraw_noise.normal_generators()
  assert sorted(generators) == sorted(convdraw_noise.VARIANTS)
  key = jax.random.PRNGKey(4)
  shape = (8, 32, 14, 14, 8)
  for name, draw in generators.items():
    noise = np.asarray(jax.jit(lambda k, draw=draw: draw(k, shape))(key))
    assert noise.shape == shape and noise.dtype == np.float32
    if name == "zeros":
      assert not noise.any()
      continue
    np.testing.assert_array_equal(noise, np.asarray(draw(key, shape)))   # deterministic
    # 401,408 draws: mean within 5 standard errors, variance and kurtosis near 1 and 3.
    assert abs(noise.mean()) < 5 / np.sqrt(noise.size)
    assert abs(noise.var() - 1) < 0.01
    assert abs(np.mean(noise**4) - 3) < 0.05
  other = np.asarray(generators["rbg"](jax.random.PRNGKey(5), shape))
  assert not np.array_equal(other, np.asarray(generators["rbg"](key, shape)))


def test_convdraw_noise_rejects_an_unknown_variant():
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.convdraw_noise", "--noise_variants=base,philox",
       "--json="],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert "--noise_variants must name some of" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow   # about 20 s: two ConvDraw steps compiled in a fresh process
def test_convdraw_noise_cli_writes_the_results(tmp_path):
  out = tmp_path / "noise.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.convdraw_noise", "--noise_variants=base,zeros",
       "--batch=2", "--rounds=1", "--seconds=0.05", f"--json={out}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results["machine"]["xla_flags"] == convdraw_mnist.get_config().xla_flags
  assert list(results["variants"]) == ["base", "zeros"]
  assert results["variants"]["base"]["x_of_base"] == 1.0
  # No noise: fewer FLOPs (exp(log s) * eps and its gradient are gone).
  assert results["variants"]["zeros"]["gflop"] < results["variants"]["base"]["gflop"]
  assert set(results["alone_ms"]) == {"base", "rbg", "unsafe_rbg"}
  assert results["noise_shape"] == [8, 2, 14, 14, 8]   # T, batch, h/2, w/2, latent


def test_xla_options_reads_its_variants():
  from benchmarks import xla_options

  variants = xla_options.parse_variants(
      ["a:xla_cpu_ftz=true,--xla_cpu_parallel_codegen_split_count=4",
       "b: xla_cpu_scheduler_type = CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
       "c:xla_cpu_experimental_ynn_fusion_type=A+B", "d:xla_cpu_experimental_ynn_fusion_type="])
  assert variants == {
      "base": {}, "base2": {},
      "a": {"xla_cpu_ftz": True, "xla_cpu_parallel_codegen_split_count": 4},
      "b": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
      "c": {"xla_cpu_experimental_ynn_fusion_type": "A,B"},   # a list option's items
      "d": {"xla_cpu_experimental_ynn_fusion_type": ""}}      # a list option cleared
  for bad, message in [("a", "name:option=value"), ("a:", "name:option=value"),
                       (":x=1", "name:option=value"), ("a:x", "is not option=value"),
                       ("a:x=1,y", "is not option=value"), ("base:x=1", "distinct")]:
    with pytest.raises(ValueError, match=message):
      xla_options.parse_variants([bad])
  with pytest.raises(ValueError, match="distinct"):
    xla_options.parse_variants(["a:x=1", "a:y=2"])


def test_xla_options_checks_every_option_with_xla():
  from benchmarks import xla_options

  xla_options.check_options({"base": {}, "ok": {"xla_cpu_ftz": True}})
  with pytest.raises(ValueError, match="'bogus'.*No such compile option"):
    xla_options.check_options({"bogus": {"xla_cpu_no_such_option": True}})
  with pytest.raises(ValueError, match="'enum'.*not a valid enum value"):
    xla_options.check_options({"enum": {"xla_cpu_scheduler_type": "FASTEST"}})
  # A list of enums, and the empty list (YNNPACK kept out of the program).
  xla_options.check_options({"list": {"xla_cpu_experimental_ynn_fusion_type":
                                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
                             "empty": {"xla_cpu_experimental_ynn_fusion_type": ""}})


def test_xla_options_cli_refuses_an_unknown_option_before_compiling():
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.xla_options", "--model=conv_vae", "--json=",
       "--variant=x:xla_cpu_no_such_option=1"],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert "No such compile option" in done.stderr.strip().splitlines()[-1]
  assert "compiled in" not in done.stdout


@pytest.mark.slow   # about 15 s: three conv VAE steps compiled in a fresh process
def test_xla_options_cli_writes_the_results(tmp_path):
  out = tmp_path / "options.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.xla_options", "--model=conv_vae", "--batch=2",
       "--rounds=1", "--seconds=0.05", f"--json={out}", "--variant=ftz:xla_cpu_ftz=true"],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results["model"] == "conv_vae" and results["batch"] == 2
  assert list(results["variants"]) == ["base", "base2", "ftz"]
  base, ftz = results["variants"]["base"], results["variants"]["ftz"]
  assert base["x_of_base"] == 1.0 and base["options"] == {}
  assert ftz["options"] == {"xla_cpu_ftz": True}
  # The same program compiled twice is the same HLO; ftz acts in LLVM only.
  assert results["variants"]["base2"]["hlo_same_as_base"] and ftz["hlo_same_as_base"]
  assert len(ftz["rates"]) == 1 and ftz["steps_per_s"] > 0


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_the_benchmark_and_experiment_modules_import_together(order):
  """Their absl flags do not collide (the tests import several in one process)."""
  modules = ["benchmarks.step_time", "benchmarks.conv_ops", "benchmarks.convdraw_noise",
             "benchmarks.input_pipeline", "benchmarks.xla_options", "benchmarks.convdraw_parts",
             "experiments.main", "experiments.evaluate",
             "experiments.information_plane", "experiments.phase_transitions",
             "experiments.train_classifier", "experiments.micro_mnist"]
  if order == "reversed":
    modules = modules[::-1]
  code = "import importlib\nfor m in %r:\n  importlib.import_module(m)\n" % (modules,)
  done = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]


class _FakeRunner:
  def __init__(self, ms):
    self.rates = [1e3 / m for m in ms]


def test_convdraw_parts_splits_the_step_into_convolutions_and_the_rest():
  from benchmarks import convdraw_parts

  ms = {"jax xla": [120, 110], "jax onednn": [90, 100], "jax onednn_winograd": [80, 90],
        "jax skip": [50, 50], "torch": [100, 100], "torch skip": [40, 40]}
  out = convdraw_parts.parts({name: _FakeRunner(v) for name, v in ms.items()})
  assert out["step_ms"]["jax xla"] == pytest.approx(115)
  assert out["outside_convolutions"] == pytest.approx(
      {"jax_ms": 50, "torch_ms": 40, "jax_over_torch": 0.8})
  convs = out["convolutions"]
  assert convs["torch_ms"] == pytest.approx(60)
  assert convs["jax_xla_ms"] == pytest.approx(65)          # median of 70 and 60
  assert convs["jax_xla_over_torch"] == pytest.approx((60 / 70 + 1) / 2)
  assert convs["jax_onednn_ms"] == pytest.approx(45)       # 40 and 50
  assert convs["jax_onednn_over_torch"] == pytest.approx((1.5 + 1.2) / 2)
  assert convs["jax_onednn_winograd_ms"] == pytest.approx(35)   # 30 and 40
  assert convs["jax_onednn_winograd_over_torch"] == pytest.approx((2 + 1.5) / 2)
  assert out["step_jax_xla_over_torch"] == pytest.approx((100 / 120 + 100 / 110) / 2)


def test_convdraw_parts_torch_skip_convolves_only_the_strided_reads(monkeypatch):
  torch = pytest.importorskip("torch")
  import types

  from benchmarks import convdraw_parts
  from benchmarks import step_time
  from benchmarks import torch_models

  # torch_runner reads --torch_device; the flags are not parsed in this process.
  monkeypatch.setattr(step_time, "_TORCH_DEVICE", types.SimpleNamespace(value="cpu"))
  config = convdraw_mnist.get_config()
  config.batch_size = 2
  runner = convdraw_parts.torch_skip_runner(torch, config, _images(4), threads=1)
  original = torch_models._conv_same, torch_models.SameConv2d.forward
  strides, conv2d = [], torch_models.F.conv2d

  def counting(x, w, bias=None, stride=1, *args):
    strides.append(stride)
    return conv2d(x, w, bias, stride, *args)

  torch_models.F.conv2d = counting
  try:
    runner.setup()
    runner.step()
  finally:
    torch_models.F.conv2d = conv2d
  # read_x once and read_error at each of the T = 8 steps; no stride-1 convolution.
  from geco_jax.models import convdraw_preset

  assert strides == [2] * (1 + convdraw_preset("mnist_cpu")["num_steps"])
  assert (torch_models._conv_same, torch_models.SameConv2d.forward) == original


@pytest.mark.slow   # about 40 s: three ConvDraw steps compiled, torch twins, in a fresh process
def test_convdraw_parts_cli_writes_the_results(tmp_path):
  pytest.importorskip("torch")
  from geco_jax.ops import onednn

  ok, why = onednn.available()
  if not ok:
    if os.environ.get("GECO_REQUIRE_ONEDNN") == "1":
      pytest.fail(f"GECO_REQUIRE_ONEDNN=1, but oneDNN is unavailable: {why}")
    pytest.skip(f"oneDNN unavailable: {why}")
  out = tmp_path / "parts.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.convdraw_parts", "--batch=2", "--rounds=1",
       "--seconds=0.05", f"--json={out}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results["step_ms"]) == {"jax xla", "jax onednn", "jax onednn_winograd",
                                     "jax skip", "torch", "torch skip"}
  # The skip program is the onednn program with other handlers: the same work
  # outside the custom calls (XLA counts no FLOPs in those).
  assert results["gflop"]["jax skip"] == results["gflop"]["jax onednn"]
  assert results["gflop"]["jax skip"] < results["gflop"]["jax xla"] / 10
  assert set(results["convolutions"]) == {
      "torch_ms", "jax_xla_ms", "jax_xla_over_torch", "jax_onednn_ms",
      "jax_onednn_over_torch", "jax_onednn_winograd_ms", "jax_onednn_winograd_over_torch"}
