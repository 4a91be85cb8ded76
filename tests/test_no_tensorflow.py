"""experiments.no_tensorflow: the trainer's logs through torch's TensorBoard writer.

The stand-in needs torch (the ``bench`` extra); those tests are skipped without it.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import information_plane
from tests.test_train import ROOT

_TRAIN = """
import json, sys
from experiments import no_tensorflow
assert no_tensorflow.install(force=True)
from clu import metric_writers
from experiments import train
from tests.test_train import tiny_config
summary = train.train_and_evaluate(tiny_config(num_steps=4, image_every=4), sys.argv[1])
print("SUMMARY " + json.dumps({"lambda": summary["lambda"], "writer": repr(
    metric_writers.SummaryWriter)}))
"""


def test_a_run_logs_scalars_that_the_information_plane_reads(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("torch.utils.tensorboard")
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _TRAIN, str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith("SUMMARY "))
  summary = json.loads(line[len("SUMMARY "):])
  assert "no_tensorflow" in summary["writer"]
  series = information_plane.read_scalars(str(workdir), ("lambda/re", "kl", "rmse", "nope"))
  assert set(series) == {"lambda/re", "kl", "rmse"}
  assert [step for step, _ in series["lambda/re"]] == [2, 4]
  assert series["lambda/re"][-1][1] == pytest.approx(summary["lambda"]["re"], rel=1e-6)
  assert (workdir / "checkpoints").is_dir() and (workdir / "config.json").exists()


def test_install_leaves_clu_alone_where_tensorflow_is_installed():
  pytest.importorskip("tensorflow")
  result = subprocess.run(
      [sys.executable, "-c", "from experiments import no_tensorflow; "
       "print(no_tensorflow.install())"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "False"


def test_without_a_module_it_prints_usage_and_exits_2():
  result = subprocess.run([sys.executable, "-m", "experiments.no_tensorflow"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("usage: python -m experiments.no_tensorflow")
