r"""Figures 2 and 7 of "Taming VAEs": reconstruction fixed points and phase transitions.

  python -m experiments.phase_transitions --outdir docs/figures

Figure 2 (``fig2_phase_transitions.png``): the tiled fixed-point map
(``geco_jax.theory``, Appendix A: a 32x32 grid on [-1, 1]^2, uniform prior,
at most 400 steps, stop below 1e-3; smoothing 0.5) on a 2-D mixture of 8
Gaussians (200 points, std 0.03) arranged in three spatial scales (pairs of
blobs 0.24 apart, pairs of pairs 0.6 apart, two groups 1.0 apart). Top:
trajectories of the tiles' reconstructions (grey; every other tile along
each side), fixed points (red) and data (blue) for four betas, one per
phase. Bottom: the order parameter ``E(beta)`` over a sweep of 80 betas
(stopping at 2e-4 / 1000 steps, see ``SWEEP_TOL``) with the detected
critical temperatures (the top-3 peaks of ``|d^2 E / d beta^2|``) as grey
lines, and the second derivative itself.

Figure 7 (``fig7_lipschitz.png``): mixtures of lines (left) and circles
(right), 200 points each; top row no constraint and growing beta; middle row
local Lipschitz constraints (8 neighbouring tiles) of growing strength at
beta = 0.002; bottom row global ones (all pairs, weight (h / distance)^2).

Prints the detected critical temperatures, the fixed-point counts of the
sweep and the wall time; ``--quick`` runs a smaller version (16x16 grid,
fewer betas) for a smoke test.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

# Before pyplot is imported anywhere: no display needed.
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from geco_jax import theory  # noqa: E402
from geco_jax.data import mixtures  # noqa: E402

# Three spatial scales: blobs in pairs 0.24 apart, pairs 0.6 apart in y,
# groups 1.0 apart in x.
HIERARCHY = np.array([(sx * 0.5 + bx * 0.12, sy * 0.3)
                      for sx in (-1, 1) for sy in (-1, 1) for bx in (-1, 1)])
FIG2_BETAS = (0.005, 0.04, 0.15, 0.35)       # 8, 4, 2 and 1 fixed points
FIG7_BETAS = (0.002, 0.01, 0.04)             # top row, no constraint
FIG7_BETA = 0.002                            # middle and bottom rows
FIG7_STRENGTHS = {"local": (0.03, 0.1, 0.3), "global": (0.003, 0.01, 0.03)}
# The sweep stops tighter than Appendix A's 1e-3 (400 steps): near a
# transition, tiles still creeping towards a fixed point would otherwise be
# counted as extra fixed points (the critical temperatures barely move).
SWEEP_TOL, SWEEP_MAX_ITERS = 2e-4, 1000


def hierarchical_gaussians(num_points: int, seed: int = 0) -> np.ndarray:
  """The Fig. 2 data: 8 blobs (std 0.03) at three scales, ``[N, 2]``."""
  return mixtures.mixture_of_gaussians(num_points, centres=HIERARCHY,
                                       std=0.03, seed=seed)["points"]


def draw_fixed_points(ax, data, result, title: str, every: int = 1) -> None:
  """Data (blue), trajectories (grey) and fixed points (red) on one panel.

  ``every``: draw the trajectories of every ``every``-th tile along each
  side of the grid only (all fixed points are drawn).
  """
  if result.trajectories is not None:
    side = int(round(np.sqrt(result.trajectories.shape[1])))
    tiles = np.arange(side * side).reshape(side, side)[::every, ::every]
    paths = np.transpose(result.trajectories[:, tiles.ravel()], (1, 0, 2))
    ax.add_collection(LineCollection(paths, colors="0.7", linewidths=0.4,
                                     zorder=1))
  ax.scatter(data[:, 0], data[:, 1], s=2, c="tab:blue", zorder=2,
             linewidths=0)
  size = 14 if len(result.fixed_points) <= 64 else 3
  ax.scatter(result.fixed_points[:, 0], result.fixed_points[:, 1], s=size,
             c="red", zorder=3, linewidths=0)
  ax.set_xlim(-1.05, 1.05)
  ax.set_ylim(-1.05, 1.05)
  ax.set_aspect("equal")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=8)


def save_png(fig, path: str, dpi: int) -> None:
  """Saves ``fig`` as a small PNG: 96-colour palette, optimised."""
  from PIL import Image   # matplotlib depends on Pillow
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  buffer.seek(0)
  image = Image.open(buffer).convert("RGB")
  image.quantize(colors=96, method=Image.Quantize.FASTOCTREE).save(
      path, optimize=True)


def _every(grid_size: int) -> int:
  """Draw about 16 x 16 trajectories whatever the grid."""
  return max(1, grid_size // 16)


def figure_2(outdir: str, *, grid_size: int, num_points: int, num_betas: int,
             dpi: int) -> dict:
  """Runs the sweep, detects the critical temperatures, saves the figure."""
  data = hierarchical_gaussians(num_points)
  betas = np.linspace(0.0025, 0.4, num_betas)
  sweep = theory.fixed_point_sweep(data, betas, grid_size=grid_size,
                                   tol=SWEEP_TOL, max_iters=SWEEP_MAX_ITERS)
  critical = theory.critical_temperatures(betas, sweep.reconstruction_error,
                                          top_k=3)
  runs = [theory.reconstruction_fixed_points(
      data, beta, grid_size=grid_size, return_trajectories=True)
          for beta in FIG2_BETAS]

  fig = plt.figure(figsize=(10, 5.4))
  grid = fig.add_gridspec(2, 4, height_ratios=(1, 0.8))
  for column, (beta, run) in enumerate(zip(FIG2_BETAS, runs)):
    draw_fixed_points(fig.add_subplot(grid[0, column]), data, run,
                      f"beta = {beta:g}: {len(run.fixed_points)} fixed points",
                      every=_every(grid_size))
  error_ax = fig.add_subplot(grid[1, :2])
  error_ax.plot(betas, sweep.reconstruction_error, ".", ms=3, c="tab:blue",
                label="E(beta)")
  error_ax.plot(betas, critical.smoothed, "-", lw=1, c="tab:blue",
                label="smoothed")
  curvature_ax = fig.add_subplot(grid[1, 2:])
  curvature_ax.plot(betas, critical.second_derivative, "-", lw=1, c="k")
  for ax in (error_ax, curvature_ax):
    for beta in critical.betas:
      ax.axvline(beta, color="0.6", lw=1, zorder=0)
    ax.set_xlabel("beta")
    ax.tick_params(labelsize=7)
  error_ax.set_title("expected reconstruction error E(beta); grey: "
                     "critical temperatures", fontsize=8)
  error_ax.legend(fontsize=7, loc="upper left")
  curvature_ax.set_title("d^2 E / d beta^2", fontsize=8)
  fig.tight_layout()
  save_png(fig, os.path.join(outdir, "fig2_phase_transitions.png"), dpi)
  plt.close(fig)
  return {"critical_betas": critical.betas,
          "heights": critical.heights,
          "betas": betas,
          "num_fixed_points": sweep.num_fixed_points,
          "converged": sweep.converged}


def figure_7(outdir: str, *, grid_size: int, num_points: int,
             dpi: int) -> None:
  """Lines and circles under no, local and global Lipschitz constraints."""
  datasets = {
      "lines": mixtures.mixture_of_lines(num_points, seed=0)["points"],
      "circles": mixtures.mixture_of_circles(num_points, seed=0)["points"],
  }
  projections = {
      (kind, strength): theory.lipschitz_projection(
          grid_size, kind=kind, strength=strength)
      for kind, strengths in FIG7_STRENGTHS.items() for strength in strengths}
  fig, axes = plt.subplots(3, 6, figsize=(12, 6.4))
  for offset, (name, data) in enumerate(datasets.items()):
    for column in range(3):
      ax = axes[0, 3 * offset + column]
      beta = FIG7_BETAS[column]
      run = theory.reconstruction_fixed_points(
          data, beta, grid_size=grid_size, return_trajectories=True)
      draw_fixed_points(ax, data, run, f"{name}, beta = {beta:g}",
                        every=_every(grid_size))
      for row, kind in ((1, "local"), (2, "global")):
        strength = FIG7_STRENGTHS[kind][column]
        run = theory.reconstruction_fixed_points(
            data, FIG7_BETA, grid_size=grid_size,
            lipschitz=projections[kind, strength], return_trajectories=True)
        draw_fixed_points(axes[row, 3 * offset + column], data, run,
                          f"{kind}, gamma = {strength:g}",
                          every=_every(grid_size))
  axes[0, 0].set_ylabel("no constraint", fontsize=8)
  axes[1, 0].set_ylabel(f"local, beta = {FIG7_BETA:g}", fontsize=8)
  axes[2, 0].set_ylabel(f"global, beta = {FIG7_BETA:g}", fontsize=8)
  fig.tight_layout()
  save_png(fig, os.path.join(outdir, "fig7_lipschitz.png"), dpi)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.phase_transitions",
      description="Figures 2 and 7 of 'Taming VAEs' (fixed points, phase "
                  "transitions, Lipschitz constraints).")
  parser.add_argument("--outdir", default="docs/figures",
                      help="where the PNGs go (created if missing)")
  parser.add_argument("--grid_size", type=int, default=32,
                      help="tiles per side of the latent grid")
  parser.add_argument("--num_points", type=int, default=200,
                      help="data points per mixture")
  parser.add_argument("--num_betas", type=int, default=80,
                      help="betas in the Fig. 2 sweep")
  parser.add_argument("--dpi", type=int, default=80)
  parser.add_argument("--quick", action="store_true",
                      help="a small smoke-test run (16x16 grid, 30 betas)")
  args = parser.parse_args(argv)
  if args.quick:
    args.grid_size, args.num_betas = 16, 30
  for name in ("grid_size", "num_points", "dpi"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.num_betas < 3:
    parser.error("--num_betas must be at least 3")
  os.makedirs(args.outdir, exist_ok=True)

  start = time.perf_counter()
  found = figure_2(args.outdir, grid_size=args.grid_size,
                   num_points=args.num_points, num_betas=args.num_betas,
                   dpi=args.dpi)
  after_fig2 = time.perf_counter()
  figure_7(args.outdir, grid_size=args.grid_size,
           num_points=args.num_points, dpi=args.dpi)
  end = time.perf_counter()

  print("critical temperatures (beta, highest |d2E/dbeta2| first): "
        + ", ".join(f"{b:.4f}" for b in found["critical_betas"]))
  changes = np.flatnonzero(np.diff(found["num_fixed_points"]))
  print("fixed points along the sweep: "
        + ", ".join(f"{found['num_fixed_points'][i]}->"
                    f"{found['num_fixed_points'][i + 1]} between beta "
                    f"{found['betas'][i]:.4f} and {found['betas'][i + 1]:.4f}"
                    for i in changes))
  print(f"sweep runs converged: {int(found['converged'].sum())}/"
        f"{len(found['converged'])}")
  print(f"wall time: figure 2 {after_fig2 - start:.1f} s, figure 7 "
        f"{end - after_fig2:.1f} s, total {end - start:.1f} s")
  print(f"saved {os.path.join(args.outdir, 'fig2_phase_transitions.png')} "
        f"and {os.path.join(args.outdir, 'fig7_lipschitz.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
