r"""Reconstruction fixed points of a high-capacity beta-VAE (Prop. 3.2, Appendix A).

With a decoder that is constant, ``M_k``, on tile ``k`` of a tiled latent
space (``tiles``: a ``G x G`` grid, prior mass ``pi_k`` per tile), the
optimal posterior and decoder of a beta-VAE with Gaussian likelihood of
standard deviation ``sigma`` satisfy (``docs/paper-notes.md`` section 8)::

    w_ik  = pi_k exp(-||x_i - M_k||^2 / T) / sum_k' pi_k' exp(-||x_i - M_k'||^2 / T)
    F(M)_k = sum_i w_ik x_i / sum_i w_ik,              T = 2 sigma^2 beta,

``w_ik = q(tile k | x_i)``: the decoder is a convex combination of the data
(the pre-image iteration of kernel PCA with a normalised Gaussian kernel).
Following Appendix A the map is iterated with exponential smoothing::

    M <- (1 - eps) M + eps P F(M)

(``P = I`` unless a Lipschitz projection is given, see ``lipschitz``) until
``max_iters`` steps or until the step is below ``tol``. As beta (the
temperature ``T``) grows, tiles' reconstructions merge into fewer and fewer
distinct fixed points: the phase transitions of Fig. 2. The order parameter
is the expected reconstruction error::

    E(beta) = (1 / N) sum_i sum_k w_ik ||x_i - M_k||^2.

GECO's Lagrangian, ``KL + lambda E[C]`` with the RE constraint
``C = ||x - g(z)||^2 - kappa^2``, has the same fixed points with the exponent
``-lambda C`` in place of ``-||x - g||^2 / T``: the ``lambda kappa^2`` it adds
is the same for every tile and cancels when ``w`` is normalised, and the
decoder's update is the same weighted mean. So a multiplier lambda is the
temperature ``T = 1 / lambda``, i.e. ``beta = 1 / (2 sigma^2 lambda)``
(``beta_from_multiplier``): a large multiplier is a low temperature, sharp
reconstructions, many fixed points.

Conventions, where the paper leaves a choice:

* Log space: ``log w`` is normalised over tiles with ``logsumexp``, and for
  the decoder weights ``w_ik / sum_i w_ik`` each column of ``log w`` is
  shifted by its maximum over data points before ``exp``, so neither
  underflows even at tiny ``T`` (a tile far from all data still follows the
  data it weighs most, as the exact map does). A tile whose column of
  weights is exactly zero (prior mass 0) keeps its current ``M_k`` in ``F``
  (a Lipschitz projection may still move it).
* Initialisation: for 2-D data, ``M_k`` starts at the tile's latent centre
  ``c_k`` read as a data point (the paper's set-up: data and latent square
  both near ``[-1, 1]^2``). For ``D != 2`` the grid is laid on the data's
  principal plane: ``M_k = mean + sum_j (c_kj - mid) / half * s_j u_j`` over
  the first ``min(D, 2)`` principal directions ``u_j`` (standard deviations
  ``s_j``), with ``mid`` and ``half`` the centre and half-width of the latent
  range. ``init=`` replaces either start. Always, uniform noise on
  ``[-init_noise, init_noise]^D`` (data units) from
  ``np.random.default_rng(seed)`` is added.
* Smoothing: the paper's ``eps`` was lost in extraction; the default is
  ``eps = 0.5``. With the paper's stopping rule (a step below ``tol = 1e-3``)
  it means a residual ``||F(M) - M|| < tol / eps = 2e-3``; ``eps = 0.1``
  stops at a residual 5 times larger after about 5 times more steps, which
  left visibly unmerged tiles near the transitions (measured on the Fig. 2
  mixture). Trajectories stay smooth enough to draw.
* Stopping: after step ``t``, ``delta_t = max_k ||M_k^t - M_k^{t-1}||``
  (Euclidean per tile, max over tiles, of the smoothed step); the loop stops
  when ``delta_t < tol`` (``converged``) or after ``max_iters`` steps.
* Distinct fixed points: on the host, after the compiled loop, tiles whose
  reconstructions lie within ``merge_tol`` of one another are linked and the
  connected components (single linkage) merged; each fixed point is the mean
  of its tiles' reconstructions, ordered by their lowest tile index.
* The data are centred before the loop (the map commutes with translations)
  to keep ``||x||^2 - 2 x.M + ||M||^2`` accurate in float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geco_jax._validation import check_int
from geco_jax.theory.tiles import check_latent_range
from geco_jax.theory.tiles import tile_centres
from geco_jax.theory.tiles import tile_prior

__all__ = [
    "beta_from_multiplier",
    "FixedPointSweep",
    "FixedPoints",
    "fixed_point_sweep",
    "merge_fixed_points",
    "reconstruction_fixed_points",
]


class FixedPoints(NamedTuple):
  """What ``reconstruction_fixed_points`` found, as NumPy arrays on the host.

  Attributes:
    reconstructions: ``M``, float32 ``[K, D]``, the final reconstruction of
      every tile (``K = grid_size^2``).
    fixed_points: float32 ``[P, D]``, the distinct points of ``M`` merged
      within ``merge_tol``.
    tile_labels: int32 ``[K]``, the row of ``fixed_points`` of each tile.
    weights: ``w``, float32 ``[N, K]``, the posteriors ``q(tile k | x_i)``
      at the final ``M`` (rows sum to 1).
    reconstruction_error: ``E(beta)`` at the final ``M``, a float.
    iterations: steps taken, an int in ``[1, max_iters]``.
    converged: whether the last step was below ``tol``.
    trajectories: float32 ``[iterations + 1, K, D]``, ``M`` before the first
      and after every step, when asked; else None.
    prior: float64 ``[K]``, the tile masses ``pi_k``.
    latent_centres: float64 ``[K, 2]``, the tile centres ``c_k``.
    beta: the beta of the run.
    temperature: ``T = 2 sigma^2 beta``.
  """
  reconstructions: np.ndarray
  fixed_points: np.ndarray
  tile_labels: np.ndarray
  weights: np.ndarray
  reconstruction_error: float
  iterations: int
  converged: bool
  trajectories: Optional[np.ndarray]
  prior: np.ndarray
  latent_centres: np.ndarray
  beta: float
  temperature: float


class FixedPointSweep(NamedTuple):
  """What ``fixed_point_sweep`` found for every beta, as NumPy arrays.

  Attributes:
    betas: float64 ``[B]``, the betas in the order given.
    reconstruction_error: float64 ``[B]``, ``E(beta)``.
    reconstructions: float32 ``[B, K, D]``.
    fixed_points: a list of ``B`` float32 arrays ``[P_b, D]``.
    num_fixed_points: int ``[B]``, ``P_b``.
    tile_labels: int32 ``[B, K]``.
    iterations: int ``[B]``.
    converged: bool ``[B]``.
    prior: float64 ``[K]``.
    latent_centres: float64 ``[K, 2]``.
  """
  betas: np.ndarray
  reconstruction_error: np.ndarray
  reconstructions: np.ndarray
  fixed_points: list
  num_fixed_points: np.ndarray
  tile_labels: np.ndarray
  iterations: np.ndarray
  converged: np.ndarray
  prior: np.ndarray
  latent_centres: np.ndarray


# ------------------------------------------------------------------ checks ---

def _check_data(data) -> np.ndarray:
  try:
    array = np.asarray(data, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f"data must be an array of shape [N, D]; got {type(data).__name__}."
    ) from None
  if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(
        f"data must be a 2-D array [N, D] with N, D >= 1; got shape "
        f"{array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError("data must be finite (no NaN or inf).")
  return array


def _check_positive(value, name: str) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number; got {value!r}.") from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be finite and > 0; got {value!r}.")
  return value


def _check_non_negative(value, name: str) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number; got {value!r}.") from None
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be finite and >= 0; got {value!r}.")
  return value


def _check_betas(betas) -> np.ndarray:
  try:
    betas = np.asarray(betas, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"betas must be a 1-D array of numbers; got {betas!r}."
                     ) from None
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(
        f"betas must be a non-empty 1-D array; got shape {betas.shape}.")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0):
    raise ValueError(f"every beta must be finite and > 0; got {betas}.")
  return betas


def beta_from_multiplier(lagrange_multiplier, sigma: float = 1.0):
  """The beta whose fixed points are those of GECO's RE Lagrangian at ``lambda``.

  With ``C = ||x - g(z)||^2 - kappa^2`` the Lagrangian's fixed-point map has
  the exponent ``-lambda C``; the constant ``lambda kappa^2`` cancels in the
  normalisation over tiles, so it is the beta-VAE map at the temperature
  ``T = 2 sigma^2 beta = 1 / lambda`` (module docstring; paper-notes section 8).

  Args:
    lagrange_multiplier: lambda > 0, a float or an array (e.g. a run's
      multipliers over training, to sweep the fixed points along it).
    sigma: the ``sigma`` the fixed points will be computed with, > 0.

  Returns:
    ``1 / (2 sigma^2 lambda)``, a float64 (array for an array).
  """
  try:
    lam = np.asarray(lagrange_multiplier, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"the Lagrange multiplier must be a number or an array of them; "
                     f"got {lagrange_multiplier!r}.") from None
  sigma = _check_positive(sigma, "sigma")
  if not np.all(np.isfinite(lam) & (lam > 0)):
    raise ValueError(
        f"the Lagrange multiplier must be finite and > 0; got {lagrange_multiplier!r}.")
  beta = 1.0 / (2.0 * sigma * sigma * lam)
  return float(beta) if beta.ndim == 0 else beta


def _temperature(beta: float, sigma: float) -> float:
  temperature = 2.0 * sigma * sigma * beta
  if not (np.isfinite(np.float32(temperature))
          and np.float32(temperature) > 0):
    raise ValueError(
        f"the temperature T = 2 sigma^2 beta = {temperature!r} is not a "
        f"positive float32.")
  return temperature


class _Setup(NamedTuple):
  data: np.ndarray          # float64 [N, D], centred
  mean: np.ndarray          # float64 [D]
  init: np.ndarray          # float64 [K, D], centred
  prior: np.ndarray         # float64 [K]
  centres: np.ndarray       # float64 [K, 2]
  projection: Optional[np.ndarray]
  sigma: float
  smoothing: float
  max_iters: int
  tol: float
  merge_tol: float


def _setup(data, *, sigma, grid_size, latent_range, prior, smoothing,
           max_iters, tol, seed, init_noise, lipschitz, merge_tol,
           init=None) -> _Setup:
  """Validates every argument but beta and builds the initial state."""
  data = _check_data(data)
  grid_size = check_int(grid_size, "grid_size", 1)
  lo, hi = check_latent_range(latent_range)
  sigma = _check_positive(sigma, "sigma")
  smoothing = _check_positive(smoothing, "smoothing")
  if smoothing > 1:
    raise ValueError(f"smoothing must be in (0, 1]; got {smoothing!r}.")
  max_iters = check_int(max_iters, "max_iters", 1)
  tol = _check_non_negative(tol, "tol")
  seed = check_int(seed, "seed", 0)
  init_noise = _check_non_negative(init_noise, "init_noise")
  merge_tol = _check_non_negative(merge_tol, "merge_tol")
  masses = tile_prior(grid_size, (lo, hi), prior)
  centres = tile_centres(grid_size, (lo, hi))
  num_tiles = grid_size * grid_size
  projection = None
  if lipschitz is not None:
    projection = np.asarray(lipschitz, np.float64)
    if projection.shape != (num_tiles, num_tiles):
      raise ValueError(
          f"lipschitz must be a [{num_tiles}, {num_tiles}] projection for the "
          f"{grid_size}x{grid_size} grid (see lipschitz_projection); got "
          f"shape {projection.shape}.")
    if not np.all(np.isfinite(projection)):
      raise ValueError("lipschitz must be finite.")

  mean = data.mean(axis=0)
  centred = data - mean
  dim = data.shape[1]
  if init is not None:
    init = np.asarray(init, np.float64)
    if init.shape != (num_tiles, dim) or not np.all(np.isfinite(init)):
      raise ValueError(
          f"init must be finite reconstructions of shape [{num_tiles}, {dim}] "
          f"(tiles, data dimension); got shape {init.shape}.")
    init = init - mean
  elif dim == 2:
    init = centres - mean
  else:
    # The latent grid laid on the data's principal plane.
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    stds = singular / math.sqrt(len(data))
    unit = (centres - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
    rank = min(dim, 2, len(stds))
    init = (unit[:, :rank] * stds[:rank]) @ directions[:rank]
  rng = np.random.default_rng(seed)
  init = init + init_noise * rng.uniform(-1.0, 1.0, size=init.shape)
  return _Setup(centred, mean, init, masses, centres, projection, sigma,
                smoothing, max_iters, tol, merge_tol)


# ---------------------------------------------------------- compiled loop ---

def _log_weights(data, means, log_prior, temperature):
  """``log w`` ``[N, K]`` (rows normalised) and squared distances ``[N, K]``."""
  squared = (jnp.sum(data * data, axis=1)[:, None]
             - 2.0 * data @ means.T
             + jnp.sum(means * means, axis=1)[None, :])
  squared = jnp.maximum(squared, 0.0)
  logits = log_prior[None, :] - squared / temperature
  log_w = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  return log_w, squared


def _step(means, data, log_prior, temperature, smoothing, projection):
  """One smoothed step ``(1 - eps) M + eps P F(M)`` and its size ``delta``."""
  log_w, _ = _log_weights(data, means, log_prior, temperature)
  # F(M)_k = sum_i w_ik x_i / sum_i w_ik with the column scaled by its max.
  peak = jnp.max(log_w, axis=0)                          # max_i log w_ik
  alive = jnp.isfinite(peak)                             # any w_ik > 0
  scaled = jnp.exp(log_w - jnp.where(alive, peak, 0.0)[None, :])
  total = jnp.sum(scaled, axis=0)                        # >= 1 when alive
  target = (scaled.T @ data) / jnp.where(alive, total, 1.0)[:, None]
  target = jnp.where(alive[:, None], target, means)
  if projection is not None:
    target = projection @ target
  new = (1.0 - smoothing) * means + smoothing * target
  delta = jnp.max(jnp.linalg.norm(new - means, axis=1))
  return new, delta


def _finish(means, data, log_prior, temperature):
  log_w, squared = _log_weights(data, means, log_prior, temperature)
  weights = jnp.exp(log_w)
  error = jnp.sum(weights * squared) / data.shape[0]
  return weights, error


def _solve_while(data, init, log_prior, temperature, smoothing, tol, max_iters,
                 projection):
  """``jax.lax.while_loop`` to convergence; returns M, iterations, delta."""
  def cond(state):
    count, _, delta = state
    return (count < max_iters) & (delta >= tol)

  def body(state):
    count, means, _ = state
    new, delta = _step(means, data, log_prior, temperature, smoothing,
                       projection)
    return count + 1, new, delta

  state = (jnp.asarray(0, jnp.int32), init, jnp.asarray(jnp.inf, init.dtype))
  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("max_iters", "trajectories"))
def _solve(data, init, log_prior, temperature, smoothing, tol, projection, *,
           max_iters: int, trajectories: bool):
  if trajectories:
    # A fixed-length scan that stops moving once done, emitting every M.
    def body(state, _):
      count, means, delta = state
      active = delta >= tol
      new, step = _step(means, data, log_prior, temperature, smoothing,
                        projection)
      means = jnp.where(active, new, means)
      return (count + active.astype(jnp.int32), means,
              jnp.where(active, step, delta)), means

    state = (jnp.asarray(0, jnp.int32), init,
             jnp.asarray(jnp.inf, init.dtype))
    (count, means, delta), path = jax.lax.scan(body, state, None,
                                               length=max_iters)
    path = jnp.concatenate([init[None], path], axis=0)
  else:
    count, means, delta = _solve_while(data, init, log_prior, temperature,
                                       smoothing, tol, max_iters, projection)
    path = None
  weights, error = _finish(means, data, log_prior, temperature)
  return means, weights, error, count, delta, path


@functools.partial(jax.jit, static_argnames=("max_iters", "batch_size"))
def _solve_sweep(data, init, log_prior, temperatures, smoothing, tol,
                 projection, *, max_iters: int, batch_size: int):
  def one(temperature):
    count, means, delta = _solve_while(data, init, log_prior, temperature,
                                       smoothing, tol, max_iters, projection)
    _, error = _finish(means, data, log_prior, temperature)
    return means, error, count, delta

  return jax.lax.map(one, temperatures,
                     batch_size=None if batch_size == 1 else batch_size)


# ------------------------------------------------------------------- host ---

def merge_fixed_points(reconstructions, merge_tol: float = 1e-2
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The distinct points of ``M``: single-linkage components within a tolerance.

  Tiles ``k`` and ``l`` are linked when ``||M_k - M_l|| <= merge_tol``; each
  connected component becomes one fixed point, the mean of its members,
  ordered by the lowest tile index in it.

  Args:
    reconstructions: ``[K, D]``.
    merge_tol: the linking distance, >= 0.

  Returns:
    ``(fixed_points [P, D] float32, tile_labels [K] int32)``.
  """
  means = np.asarray(reconstructions, np.float64)
  if means.ndim != 2:
    raise ValueError(f"reconstructions must be [K, D]; got {means.shape}.")
  merge_tol = _check_non_negative(merge_tol, "merge_tol")
  squared = np.sum(means * means, axis=1)
  distance2 = squared[:, None] - 2.0 * means @ means.T + squared[None, :]
  linked = distance2 <= merge_tol * merge_tol + 1e-12 * (
      1.0 + squared[:, None] + squared[None, :])
  labels = np.arange(len(means))
  while True:   # Label propagation: each tile takes its neighbours' minimum.
    spread = np.min(np.where(linked, labels[None, :], len(means)), axis=1)
    if np.array_equal(spread, labels):
      break
    labels = spread
  _, first, tile_labels = np.unique(labels, return_index=True,
                                    return_inverse=True)
  order = np.argsort(np.argsort(first))   # components by lowest tile index
  tile_labels = order[tile_labels].astype(np.int32)
  counts = np.bincount(tile_labels)
  points = np.zeros((len(counts), means.shape[1]))
  np.add.at(points, tile_labels, means)
  return (points / counts[:, None]).astype(np.float32), tile_labels


def _device_args(setup: _Setup):
  with np.errstate(divide="ignore"):
    log_prior = np.log(setup.prior)
  projection = (None if setup.projection is None
                else jnp.asarray(setup.projection, jnp.float32))
  return (jnp.asarray(setup.data, jnp.float32),
          jnp.asarray(setup.init, jnp.float32),
          jnp.asarray(log_prior, jnp.float32), projection)


def reconstruction_fixed_points(
    data,
    beta: float,
    *,
    sigma: float = 1.0,
    grid_size: int = 32,
    latent_range=(-1.0, 1.0),
    prior="uniform",
    smoothing: float = 0.5,
    max_iters: int = 400,
    tol: float = 1e-3,
    seed: int = 0,
    init_noise: float = 1e-2,
    lipschitz=None,
    merge_tol: float = 1e-2,
    init=None,
    return_trajectories: bool = False,
) -> FixedPoints:
  """Iterates the tiled fixed-point map of a beta-VAE at one beta.

  See the module docstring for the map, ``E(beta)`` and the conventions
  (initialisation, stopping rule, merging, zero-weight tiles). The loop is
  one compiled ``jax.lax.while_loop`` (a fixed-length ``jax.lax.scan`` that
  stops moving once done when trajectories are asked); beta is a traced
  argument, so runs that differ only in beta, seed or tolerances reuse the
  compiled program.

  Args:
    data: ``[N, D]`` training points.
    beta: > 0; the temperature is ``T = 2 sigma^2 beta``.
    sigma: the likelihood's standard deviation, > 0.
    grid_size: tiles per side ``G`` (``K = G^2`` tiles), at least 1.
    latent_range: ``(lo, hi)``, the latent square ``[lo, hi]^2``.
    prior: ``'uniform'``, ``'gaussian'`` or ``K`` masses (``tile_prior``).
    smoothing: ``eps`` in ``(0, 1]``; 1 is the plain map.
    max_iters: at most this many steps, >= 1.
    tol: stop when the largest tile step is below it, >= 0.
    seed: seeds the initial uniform noise, >= 0.
    init_noise: half-width of that noise in data units, >= 0.
    lipschitz: None, or a ``[K, K]`` projection ``P`` applied to ``F(M)``
      every step (``lipschitz_projection``).
    merge_tol: distance within which reconstructions count as one fixed
      point, >= 0.
    init: None for the default start (module docstring), or ``[K, D]``
      initial reconstructions (e.g. ``equiprobable_reconstructions``, or the
      result of a previous beta); the uniform noise is added to it too.
    return_trajectories: also return ``M`` after every step.

  Returns:
    A ``FixedPoints``.

  Raises:
    ValueError: for beta <= 0, data that is not a finite ``[N, D]`` array,
      ``grid_size < 1`` or any other argument out of its range.
  """
  setup = _setup(data, sigma=sigma, grid_size=grid_size,
                 latent_range=latent_range, prior=prior, smoothing=smoothing,
                 max_iters=max_iters, tol=tol, seed=seed,
                 init_noise=init_noise, lipschitz=lipschitz,
                 merge_tol=merge_tol, init=init)
  beta = _check_positive(beta, "beta")
  temperature = _temperature(beta, setup.sigma)
  data_j, init_j, log_prior_j, projection_j = _device_args(setup)
  means, weights, error, count, delta, path = _solve(
      data_j, init_j, log_prior_j, jnp.float32(temperature),
      jnp.float32(setup.smoothing), jnp.float32(setup.tol), projection_j,
      max_iters=setup.max_iters, trajectories=bool(return_trajectories))
  count = int(count)
  means = np.asarray(means, np.float64) + setup.mean
  fixed, labels = merge_fixed_points(means, setup.merge_tol)
  trajectories = None
  if path is not None:
    trajectories = (np.asarray(path[:count + 1], np.float64)
                    + setup.mean).astype(np.float32)
  converged = float(delta) < setup.tol
  return FixedPoints(
      reconstructions=means.astype(np.float32),
      fixed_points=fixed,
      tile_labels=labels,
      weights=np.asarray(weights),
      reconstruction_error=float(error),
      iterations=count,
      converged=bool(converged),
      trajectories=trajectories,
      prior=setup.prior,
      latent_centres=setup.centres,
      beta=beta,
      temperature=temperature)


def fixed_point_sweep(
    data,
    betas,
    *,
    sigma: float = 1.0,
    grid_size: int = 32,
    latent_range=(-1.0, 1.0),
    prior="uniform",
    smoothing: float = 0.5,
    max_iters: int = 400,
    tol: float = 1e-3,
    seed: int = 0,
    init_noise: float = 1e-2,
    lipschitz=None,
    merge_tol: float = 1e-2,
    init=None,
    batch_size: int = 1,
) -> FixedPointSweep:
  """``reconstruction_fixed_points`` for many betas in one compiled program.

  Every beta starts from the same initial ``M`` (same ``seed``). The betas
  run through ``jax.lax.map(..., batch_size=batch_size)``: ``batch_size``
  betas at a time vectorised with ``vmap`` (a vmapped while loop runs until
  the slowest of its batch is done; finished ones stay put), the batches one
  after another, which bounds memory at ``batch_size`` times ``[N, K]``
  (``batch_size = 1``: a plain compiled scan over the betas).
  Neither weights nor trajectories are kept; rerun one beta with
  ``reconstruction_fixed_points`` for those (same result: same start, same
  map).

  Args:
    data: ``[N, D]`` training points.
    betas: ``[B]`` betas > 0, in any order.
    sigma, grid_size, latent_range, prior, smoothing, max_iters, tol, seed,
      init_noise, lipschitz, merge_tol, init: as in
      ``reconstruction_fixed_points``.
    batch_size: betas vectorised together, >= 1. The default, 1, runs them
      one after another in one compiled scan: on a 2-core CPU a vmapped
      batch of 8 cost about twice as much per beta and iteration (measured
      with N = 400 points, 1024 tiles), so vectorising pays only on an
      accelerator.

  Returns:
    A ``FixedPointSweep``.

  Raises:
    ValueError: as ``reconstruction_fixed_points``, and for betas that are
      not a non-empty 1-D array of positive numbers.
  """
  setup = _setup(data, sigma=sigma, grid_size=grid_size,
                 latent_range=latent_range, prior=prior, smoothing=smoothing,
                 max_iters=max_iters, tol=tol, seed=seed,
                 init_noise=init_noise, lipschitz=lipschitz,
                 merge_tol=merge_tol, init=init)
  betas = _check_betas(betas)
  batch_size = check_int(batch_size, "batch_size", 1)
  temperatures = np.array([_temperature(b, setup.sigma) for b in betas])
  data_j, init_j, log_prior_j, projection_j = _device_args(setup)
  means, errors, counts, deltas = _solve_sweep(
      data_j, init_j, log_prior_j, jnp.asarray(temperatures, jnp.float32),
      jnp.float32(setup.smoothing), jnp.float32(setup.tol), projection_j,
      max_iters=setup.max_iters, batch_size=min(batch_size, len(betas)))
  means = np.asarray(means, np.float64) + setup.mean
  fixed, labels = zip(*(merge_fixed_points(m, setup.merge_tol) for m in means))
  return FixedPointSweep(
      betas=betas,
      reconstruction_error=np.asarray(errors, np.float64),
      reconstructions=means.astype(np.float32),
      fixed_points=list(fixed),
      num_fixed_points=np.array([len(f) for f in fixed]),
      tile_labels=np.stack(labels),
      iterations=np.asarray(counts),
      converged=np.asarray(deltas) < setup.tol,
      prior=setup.prior,
      latent_centres=setup.centres)
