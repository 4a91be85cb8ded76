"""Every experiment config loads, validates, and says how to run it."""

import importlib
import os
import pathlib

import ml_collections
import pytest

from experiments import setup

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parent.parent
                                   / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base", "paper")
                 and not p.stem.endswith("_classifier"))
PAPER = [name for name in CONFIGS if name.startswith(("convdraw_", "nvp_"))]


def test_every_paper_experiment_has_a_config():
  expected = {f"convdraw_{d}" for d in ("mnist", "color_mnist", "cifar10", "celeb_a",
                                        "mnist_triplets", "mnist_sum", "mnist_sum_hard",
                                        "mnist_rotate")}
  expected |= {f"nvp_{d}" for d in ("mnist", "color_mnist", "cifar10", "micro_mnist")}
  assert expected <= set(PAPER)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_its_docstring_gives_the_command(name, tmp_path):
  module = importlib.import_module(f"configs.{name}")
  assert f"python -m experiments.main" in module.__doc__
  assert f"configs/{name}.py" in module.__doc__
  sizes = ("cpu", "accelerator") if name in PAPER else (None,)
  for size in sizes:
    config = module.get_config(size) if size else module.get_config()
    for name in ("cla", "fre"):
      if "classifier" in config.constraints.get(name, {}):
        config.constraints[name].classifier = str(tmp_path)
    setup.validate_config(config)
    # The model's keyword arguments resolve for the dataset's image shape.
    setup.model_kwargs(config, (28, 28, 1))


def test_convdraw_configs_run_without_ynnpack_convolutions():
  """ConvDraw's configs carry the XLA flag measured to speed them up; others none."""
  from configs import paper

  for name in CONFIGS:
    config = importlib.import_module(f"configs.{name}").get_config()
    expected = (paper.CONVDRAW_CPU_XLA_FLAGS
                if config.model.name in ("convdraw", "conditional_convdraw") else "")
    assert config.xla_flags == expected, name


def test_xla_accepts_the_configs_flags():
  """XLA aborts on a flag or value it does not know: catch a renamed flag here."""
  import os
  import subprocess
  import sys

  from configs import paper

  env = dict(os.environ, XLA_FLAGS=paper.CONVDRAW_CPU_XLA_FLAGS,
             JAX_PLATFORMS="cpu")
  code = ("import jax, jax.numpy as jnp; x = jnp.ones((1, 6, 6, 2));"
          "w = jnp.ones((3, 3, 2, 4));"
          "print(float(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',"
          " dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()))")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert float(done.stdout.strip().splitlines()[-1]) == 4 * 2 * (16 * 9 + 16 * 6 + 4 * 4)


@pytest.mark.parametrize("flags", ["-O3", "--xla_cpu_enable_fast_math=true -O3"])
def test_bad_xla_flags_are_a_config_error(flags):
  from configs import default

  config = default.get_config()
  config.xla_flags = flags
  with pytest.raises(setup.ConfigError, match="xla_flags"):
    setup.validate_config(config)


def test_apply_xla_flags_puts_the_configs_flags_first(monkeypatch):
  from jax._src import xla_bridge

  from configs import default
  from experiments import cli

  config = default.get_config()
  config.xla_flags = "--xla_a=1 --xla_b=2"
  monkeypatch.setenv("XLA_FLAGS", "--xla_b=3")
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  cli.apply_xla_flags(config)
  assert os.environ["XLA_FLAGS"] == "--xla_a=1 --xla_b=2 --xla_b=3"   # the environment wins
  cli.apply_xla_flags(config)                                         # already there
  assert os.environ["XLA_FLAGS"] == "--xla_a=1 --xla_b=2 --xla_b=3"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  cli.apply_xla_flags(config)                                         # too late: unchanged
  assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("field, value, message", [
    ("lamda_lr", 1e-3, r"constraints.re: unknown field\(s\) \['lamda_lr'\]"),
    ("stride", 0, r"constraints.re: unknown field"),
])
def test_a_constraint_section_holds_only_its_own_fields(field, value, message):
  from configs import default
  config = default.get_config()
  config.constraints.re[field] = value
  with pytest.raises(setup.ConfigError, match=message):
    setup.validate_config(config)


@pytest.mark.parametrize("value", [0, -2, 2.5, True])
def test_patch_sizes_and_strides_are_positive_integers(value):
  from configs import convdraw_cifar10_pncc
  config = convdraw_cifar10_pncc.get_config()
  config.constraints.pncc.stride = value
  with pytest.raises(setup.ConfigError, match=r"constraints.pncc.stride must be an integer"):
    setup.validate_config(config)


def test_the_seed_is_a_non_negative_integer():
  from configs import default
  config = default.get_config()
  config.seed = -1
  with pytest.raises(setup.ConfigError, match="config.seed must be an integer >= 0"):
    setup.validate_config(config)


@pytest.mark.parametrize("config_name, name, value, message", [
    ("default", "re", 0.0, r"re.tolerance must be > 0 \(an RMSE\); got 0.0; a tolerance "
     r"that only a perfect reconstruction meets is never met"),
    ("default", "re", -0.1, r"re.tolerance must be > 0 \(an RMSE\); got -0.1\.$"),
    ("convdraw_cifar10_fre", "fre", 0, r"fre.tolerance must be > 0 .*never met"),
    ("convdraw_cifar10_pncc", "pncc", 1.0, r"pncc.tolerance must be in \[-1, 1\) .*never met"),
    ("convdraw_cifar10_pncc", "pncc", -1.5, r"pncc.tolerance must be in \[-1, 1\)"),
    ("mnist_cla", "cla", 1.0, r"cla.tolerance must be in \[0, 1\) \(a probability\); got "
     r"1.0; .*never met"),
])
def test_a_tolerance_never_met_is_refused(config_name, name, value, message):
  """An RMSE of 0 or a correlation of 1 is met by no reconstruction: lambda only grows."""
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.constraints[name].tolerance = value
  with pytest.raises(setup.ConfigError, match=message):
    setup.validate_config(config)


def test_the_boundary_tolerances_that_can_be_met_are_accepted():
  from configs import convdraw_cifar10_pncc, default
  config = default.get_config()
  config.geco.minimise = "squared_error"
  config.constraints = ml_collections.ConfigDict(
      {"kl": {"tolerance": 0.0}})   # a posterior equal to the prior meets it
  setup.validate_config(config)
  config = convdraw_cifar10_pncc.get_config()
  config.constraints.pncc.tolerance = -1.0
  setup.validate_config(config)


@pytest.mark.parametrize("minimise, constraints, message", [
    # GECO minimises the KL: a KL bound alone leaves the decoder untrained.
    ("kl", {"kl": {"tolerance": 5.0}}, r"only a KL constraint.*minimise='squared_error'"),
    ("squared_error", {"pncc": {"tolerance": 0.5}}, r"add config.constraints.kl"),
    ("squared_error", {"kl": {"tolerance": 5.0}, "re": {"tolerance": 0.1}},
     r"RE constraint on it as well would be redundant"),
    ("mse", {"re": {"tolerance": 0.1}}, r"geco.minimise must be one of \('kl', "
     r"'squared_error'\); got 'mse'"),
])
def test_what_geco_minimises_must_suit_its_constraints(minimise, constraints, message):
  from configs import default
  config = default.get_config()
  config.geco.minimise = minimise
  config.constraints = ml_collections.ConfigDict(constraints)
  with pytest.raises(setup.ConfigError, match=message):
    setup.validate_config(config)
  # An ELBO run only measures its constraints, whatever geco.minimise says.
  if minimise in setup.GECO_OBJECTIVES:
    config.objective = "elbo"
    setup.validate_config(config)


@pytest.mark.parametrize("name, value", [
    ("re", float("inf")), ("re", 1e30), ("kl", float("inf")), ("kl", float("nan")),
    ("fre", 2e6)])
def test_a_tolerance_that_is_not_finite_or_overflows_is_refused(name, value):
  """An infinite RE tolerance trained until the loss was NaN (D * kappa^2 overflows
  float32 from about 1e17 on a 784-pixel image), and a resume wrote it into config.json."""
  from configs import default
  config = default.get_config()
  config.constraints = ml_collections.ConfigDict({name: {"tolerance": value}})
  if name == "kl":
    config.geco.minimise = "squared_error"
  with pytest.raises(setup.ConfigError,
                     match=rf"constraints.{name}.tolerance must be finite and at most 1e\+06"):
    setup.validate_config(config)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_the_pi_gain_is_a_finite_number(value):
  from configs import default
  config = default.get_config()
  config.geco.dual = "pi"
  config.geco.pi_kp = value
  with pytest.raises(setup.ConfigError, match="config.geco.pi_kp must be finite and >= 0"):
    setup.validate_config(config)
