"""Every experiment config loads, validates, and says how to run it."""

import importlib
import pathlib

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
