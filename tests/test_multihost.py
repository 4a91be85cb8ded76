"""Two JAX processes on one machine (CPU, gloo collectives) train as one run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import train
from tests.test_train import ROOT
from tests.test_train import tiny_config

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from experiments import train
    from tests.test_train import tiny_config
    summary = train.train_and_evaluate(tiny_config(num_steps=4), sys.argv[3])
    print("RESULT " + json.dumps({"process": jax.process_index(),
                                  "devices": jax.device_count(),
                                  "lambda": summary["lambda"]["re"],
                                  "eval_kl": summary["eval"]["kl"]}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes compile the step: about a minute on 2 cores
def test_two_processes_train_like_one_and_only_process_0_writes_logs(tmp_path):
  address = f"localhost:{_free_port()}"
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  workers = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(workdir)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for worker in workers:
    out, err = worker.communicate(timeout=400)
    assert worker.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 2 for r in results)
  assert results[0]["lambda"] == results[1]["lambda"]
  # Only process 0 wrote TensorBoard events; the checkpoints are complete.
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
  assert (workdir / "checkpoints" / "4").is_dir()
  # The same global batch on one process gives the same multiplier.
  single = train.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path / "single"))
  np.testing.assert_allclose(results[0]["lambda"], single["lambda"]["re"], rtol=1e-5)
  np.testing.assert_allclose(results[0]["eval_kl"], single["eval"]["kl"], rtol=1e-4)
