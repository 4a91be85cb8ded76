r"""ELBO, GQN-annealed ELBO and GECO at several tolerances, in the information plane.

  GECO_DATA_DIR=../shared/data python -m experiments.information_plane \
      --config configs/convdraw_mnist.py --workdir runs/info_plane_convdraw_mnist \
      [--tolerances=0.06,0.08,0.1] [--match_elbo] [--variants=elbo,geco_matched] \
      [--config.num_steps=...]

For one model and dataset (the config), trains into ``workdir/<variant>``
(or, where a variant's run already finished, collects it, and its
``eval.json`` too where that evaluated the same checkpoint with the same
settings):

- ``elbo``: the Gaussian ELBO with a learned global sigma;
- ``elbo_annealed``: GQN's schedule, sigma from 2.0 to 0.7 over
  ``config.elbo.anneal_steps``;
- ``geco_re_<kappa>``: GECO with an RE constraint of per-pixel RMSE kappa,
  for each ``--tolerances``;
- with ``--match_elbo``, ``geco_matched``: GECO whose RE target is the error
  the ELBO run reached on the training images, sqrt of its mean squared
  error (``train_root_mse``; the paper's Figure 5 comparison, which matches
  the MSE; ``--match_split=test``: its error on the test set),

(``--variants`` restricts the runs to the named ones, e.g.
``--match_elbo --variants=elbo,geco_matched`` for Figure 5 alone), then
evaluates each run with ``experiments.evaluate`` (sigma-independent NLL,
average and marginal KL, RMSE) and writes into ``workdir``:

- ``results.csv`` and ``results.md``: one row per variant;
- ``trajectories.json``: lambda, the RE constraint's moving average, the
  KL and the RMSE against step for every variant (from the TensorBoard logs);
- ``information_plane.png``: NLL against KL (log KL axis);
- ``figure3.png``: the Figure 3 trajectory of the first GECO variant that
  meets its target (else the first; lambda, reconstruction error with its
  threshold, KL against step).

Two errors are reported: ``rmse``, the mean over test examples of each one's
per-pixel RMSE, and ``root_mse``, the square root of the mean squared error
over every test pixel. The RE constraint that GECO enforces (a batch mean of
||x - g||^2 - D kappa^2) is met exactly when ``root_mse`` <= kappa, so that is
what ``re_satisfied`` checks, on the test set; ``rmse`` is smaller when
examples' errors differ (Jensen's inequality). GECO enforces the constraint
on training batches, so ``geco_matched`` takes the ELBO's error on training
images as its target, and ``train_root_mse`` is the column to compare at
"the same error"; the test errors show how each generalises.

``seconds`` is the wall time of every ``train.train_and_evaluate`` call in
the variant's workdir (training, evaluations, checkpoints; a run collected
again adds its few seconds).

``colabs/information_plane.ipynb`` draws the same plots from these files.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
from typing import Any

from absl import flags
from absl import logging

from experiments import cli
from experiments import evaluate  # its --num_train / --num_marginal flags too

# Entered by cli.run before the flags are parsed: no signal is lost (see cli.StopRequest).
STOP = cli.StopRequest()
_TOLERANCES = flags.DEFINE_list("tolerances", ["0.06", "0.08", "0.1"],
                                "RE tolerances (per-pixel RMSE) of the GECO variants.")
_MATCH_ELBO = flags.DEFINE_bool("match_elbo", False,
                                "Also train GECO with the ELBO run's error on training images "
                                "(sqrt of its mean squared error) as its target.")
_MATCH_SPLIT = flags.DEFINE_enum(
    "match_split", "train", ["train", "test"],
    "With --match_elbo: the split whose ELBO error is geco_matched's target: 'train' "
    "(train_root_mse, the data GECO enforces its constraint on) or 'test' (root_mse, "
    "looser by the ELBO's generalisation gap).")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Only these variants (names as in the docstring; empty: all).")

COLUMNS = ("variant", "objective", "tolerance", "steps", "rmse", "root_mse", "train_root_mse",
           "re_satisfied",
           "average_kl", "marginal_kl", "marginal_kl_se", "nll", "nll_bits_per_dim",
           "sigma_star", "final_lambda", "seconds")


def with_objective(config, objective: str, **elbo_fields):
  """A copy of ``config`` with another objective (and ELBO fields)."""
  config = copy.deepcopy(config)
  config.objective = objective
  for key, value in elbo_fields.items():
    config.elbo[key] = value
  return config


def _geco_targets(tolerances) -> dict[str, float]:
  return {f"geco_re_{float(t):g}": float(t) for t in tolerances}


def matched_target(evaluation, split: str = "train") -> float:
  """``geco_matched``'s RE tolerance from the ELBO run's evaluation.

  The RE constraint's batch mean is D (MSE - kappa^2), so a GECO run that
  meets kappa = sqrt(MSE_elbo) has the ELBO's mean squared error, the
  quantity the paper matches ("MSE=0.00029"); the mean of per-example RMSEs
  (``rmse``) would ask for a lower MSE than the ELBO reached. GECO enforces
  it on training batches, so the MSE is the ELBO's on training images
  (``train_root_mse``); its test error (``root_mse``, ``split='test'``) is
  higher by the generalisation gap, so a GECO run given it has slack on the
  training data.
  """
  if split not in ("train", "test"):
    raise ValueError(f"matched_target: split must be 'train' or 'test'; got {split!r}.")
  return evaluation["train_root_mse" if split == "train" else "root_mse"]


def variants(config, tolerances, elbo_rmse=None) -> dict[str, Any]:
  """The configs of every variant, by name; ``elbo_rmse``: ``matched_target``."""
  out = {"elbo": with_objective(config, "elbo", learn_sigma=True)}
  out["elbo_annealed"] = with_objective(config, "elbo_annealed")
  targets = _geco_targets(tolerances)
  if elbo_rmse is not None:
    targets["geco_matched"] = float(elbo_rmse)
  for name, tolerance in targets.items():
    out[name] = with_objective(config, "geco")
    out[name].constraints.re.tolerance = tolerance
  return out


def check_selection(names, tolerances, match_elbo: bool) -> None:
  """Raises ValueError unless ``names`` (``--variants``) can all be run."""
  known = ["elbo", "elbo_annealed", *_geco_targets(tolerances)]
  known += ["geco_matched"] if match_elbo else []
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown variant(s) {', '.join(unknown)}; with these flags the "
                     f"variants are {', '.join(known)}.")
  # (an unmatched geco_matched was rejected above as unknown)
  if "geco_matched" in names and "elbo" not in names:
    raise ValueError("geco_matched takes its target from the elbo run: name elbo in "
                     "--variants too.")


def read_scalars(workdir: str, tags) -> dict[str, list[tuple[int, float]]]:
  """(step, value) series of ``tags`` from a run's TensorBoard event files.

  Reads tensor summaries (clu's TensorFlow writer) and scalar summaries (its
  torch writer, ``experiments.no_tensorflow``) alike.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  accumulator.Reload()
  available = accumulator.Tags()
  series = {}
  for tag in tags:
    if tag in available["tensors"]:
      series[tag] = sorted({e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                            for e in accumulator.Tensors(tag)}.items())
    elif tag in available["scalars"]:
      series[tag] = sorted({e.step: float(e.value) for e in accumulator.Scalars(tag)}.items())
  return series


def _row(name, config, summary, evaluation) -> dict[str, Any]:
  marginal = evaluation.get("marginal_kl") or {}
  tolerance = config.constraints.re.tolerance if config.objective == "geco" else None
  return {
      "variant": name, "objective": config.objective, "tolerance": tolerance,
      "steps": summary.get("step"), "rmse": evaluation["rmse"],
      "root_mse": evaluation["root_mse"], "train_root_mse": evaluation["train_root_mse"],
      "re_satisfied": (evaluation["root_mse"] <= tolerance) if tolerance else None,
      "average_kl": evaluation["average_kl"], "marginal_kl": marginal.get("kl"),
      "marginal_kl_se": marginal.get("standard_error"), "nll": evaluation["nll"],
      "nll_bits_per_dim": evaluation["nll_bits_per_dim"],
      "sigma_star": evaluation["sigma_star"],
      "final_lambda": (summary.get("lambda") or {}).get("re"),
      "seconds": summary.get("total_seconds", summary.get("seconds")),
  }


def markdown_table(rows) -> str:
  def fmt(value):
    if value is None:
      return "-"
    if isinstance(value, bool):
      return "yes" if value else "no"
    if isinstance(value, float):
      return f"{value:.4g}"
    return str(value)

  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def figure3_row(rows):
  """The GECO row figure3.png shows: the first that meets its target (Figure 3's
  phases, lambda rising then decaying, need a feasible target), else the first."""
  geco = [r for r in rows if r["objective"] == "geco"]
  return next((r for r in geco if r["re_satisfied"]), geco[0] if geco else None)


def plot(rows, trajectories, outdir: str) -> None:
  """information_plane.png and figure3.png from the rows and trajectories."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 4))
  for row in rows:
    marker = "o" if row["objective"] == "geco" else "s"
    ax.scatter(row["average_kl"], row["nll"], marker=marker)
    ax.annotate(row["variant"], (row["average_kl"], row["nll"]), fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("average KL (nats)")
  ax.set_ylabel("sigma-independent NLL (nats / example)")
  ax.set_title("information plane")
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "information_plane.png"), dpi=80)
  plt.close(fig)

  shown = figure3_row(rows)
  if shown is None:
    return
  name, tolerance = shown["variant"], shown["tolerance"]
  series = trajectories[name]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  # The constraint's own state: its moving average C_ma, met below 0 (the
  # logged training rmse, a mean of per-example RMSEs, sits below the error
  # that the constraint bounds).
  error_panel = (("constraint_ma/re", "RE constraint C_ma (met below 0)")
                 if "constraint_ma/re" in series else ("rmse", "RMSE (threshold dashed)"))
  panels = (("lambda/re", "lambda"), error_panel, ("kl", "KL"))
  for ax, (tag, title) in zip(axes, panels):
    if tag in series:
      steps, values = zip(*series[tag])
      ax.plot(steps, values)
    if tag == "rmse":
      ax.axhline(tolerance, linestyle="--", color="k")
    if tag == "constraint_ma/re":
      ax.axhline(0.0, linestyle="--", color="k")
      ax.set_yscale("symlog", linthresh=0.1)
    if tag == "lambda/re":
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{name}: {title}")
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "figure3.png"), dpi=80)
  plt.close(fig)


def run(config, workdir: str, tolerances, match_elbo: bool, only=(), match_split="train",
        stop=None, **eval_kwargs):
  """Train (or collect) every variant (or those in ``only``), evaluate, write the
  tables and plots.

  A variant interrupted by SIGTERM / SIGINT (its step saved) ends the whole run
  with ``cli.Interrupted``, before anything is evaluated or written of it: a
  GECO target must not come from an unfinished ELBO. ``stop``: the program's
  ``cli.StopRequest``, which is also read between variants.
  """
  from etils import epath

  from experiments import setup
  from experiments import train

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  data = setup.make_dataset(config)
  rows, trajectories = [], {}
  selected = (lambda name: name in only) if only else (lambda name: True)
  todo = {k: v for k, v in variants(config, tolerances).items() if selected(k)}
  done: set[str] = set()
  while todo:
    name, variant = next(iter(todo.items()))
    todo.pop(name)
    run_dir = os.path.join(workdir, name)
    logging.info("Variant %s -> %s", name, run_dir)
    summary = train.train_and_evaluate(variant, run_dir, data=data, stop=stop)
    if summary["interrupted"]:
      raise cli.Interrupted(
          f"stopped by {cli.signal_name(stop.signal if stop else None)} during variant "
          f"{name} at step {summary['step']}, which is saved; the same command resumes "
          "it and collects the variants already trained. No table was written.",
          stop.signal if stop else None)
    evaluation = (evaluate.stored_evaluation(run_dir, summary.get("step"), **eval_kwargs)
                  or evaluate.evaluate_run(run_dir, **eval_kwargs))
    rows.append(_row(name, variant, summary, evaluation))
    trajectories[name] = read_scalars(run_dir, ("lambda/re", "constraint_ma/re", "kl",
                                                "rmse", "sigma"))
    done.add(name)
    if stop is not None:
      stop.raise_if_requested(
          f"after variant {name} (trained and evaluated); the same command collects the "
          "variants already trained and goes on with the rest. No table was written.")
    if name == "elbo" and match_elbo:
      target = matched_target(evaluation, match_split)
      todo.update({k: v for k, v in variants(config, (), target).items()
                   if k not in done and k not in todo and selected(k)})
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown_table(rows))
  with open(os.path.join(workdir, "trajectories.json"), "w") as f:
    json.dump(trajectories, f)
  plot(rows, trajectories, workdir)
  return rows


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_or_fail()
  from experiments import setup
  try:
    tolerances = [float(t) for t in _TOLERANCES.value]
  except ValueError:
    cli.fail(f"--tolerances must be numbers; got {_TOLERANCES.value}.")
  try:
    check_selection(_VARIANTS.value, tolerances, _MATCH_ELBO.value)
  except ValueError as e:
    cli.fail(f"--variants: {e}")
  if "re" not in config.constraints:
    cli.fail("the config needs an RE constraint (config.constraints.re): the GECO "
             "variants differ in its tolerance.")
  try:
    for variant in variants(config, tolerances).values():
      setup.validate_config(variant)
    setup.prepare_workdir(cli.WORKDIR.value)
  except setup.ConfigError as e:
    cli.fail(str(e))
  cli.quiet_library_logs()
  cli.apply_xla_flags(config)
  from experiments import train
  try:
    rows = run(config, cli.WORKDIR.value, tolerances, _MATCH_ELBO.value,
               only=tuple(_VARIANTS.value), match_split=_MATCH_SPLIT.value, stop=STOP,
               num_train=evaluate.NUM_TRAIN.value,
               num_marginal=evaluate.NUM_MARGINAL.value)
  except (setup.ConfigError, FileNotFoundError) as e:
    cli.fail(" ".join(str(e).split()))
  except train.CheckpointError as e:
    cli.fail(" ".join(str(e).split()), abandon_threads=True)
  except FloatingPointError as e:  # a variant diverged: reported, its checkpoints kept
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown_table(rows))


if __name__ == "__main__":
  cli.require("config", "workdir")
  cli.run(main, stop=STOP)
