"""Tests of geco_jax.theory: fixed points, phase transitions, Lipschitz, equipartition."""

import numpy as np
import pytest

from geco_jax import theory
from geco_jax.data.mixtures import mixture_of_gaussians
from geco_jax.data.mixtures import mixture_of_lines

# Small problems, few shapes (each new shape compiles the loop again).
GRID = 8
CLUSTERS = np.array([[-0.6, -0.5], [-0.3, -0.5], [0.6, 0.4], [0.6, 0.7]])
# Tight enough that stragglers near a transition do not count as fixed points.
TIGHT = dict(tol=1e-5, max_iters=3000)


@pytest.fixture(scope="module")
def clusters():
  """40 points in 4 tight clusters: two pairs, 0.3 apart, the pairs ~1.4 apart."""
  out = mixture_of_gaussians(40, centres=CLUSTERS, std=0.01, seed=0)
  return out["points"].astype(np.float64), out["component"]


@pytest.fixture(scope="module")
def blob():
  """12 points of a broad blob: a fixed point set that is not just the data."""
  return mixture_of_gaussians(12, centres=[[0.1, -0.2]], std=0.3,
                              seed=3)["points"].astype(np.float64)


def _hull(points):
  """Counter-clockwise convex hull (Andrew's monotone chain)."""
  points = sorted(map(tuple, np.asarray(points, np.float64)))

  def cross(o, a, b):
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

  lower, upper = [], []
  for p in points:
    while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
      lower.pop()
    lower.append(p)
  for p in reversed(points):
    while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
      upper.pop()
    upper.append(p)
  return np.array(lower[:-1] + upper[:-1])


def _inside_hull(points, data, slack):
  """Half-plane test: every point is left of every CCW hull edge (- slack)."""
  hull = _hull(data)
  start, end = hull, np.roll(hull, -1, axis=0)
  edge = end - start
  normal = np.stack([-edge[:, 1], edge[:, 0]], axis=1)
  normal /= np.linalg.norm(normal, axis=1, keepdims=True)   # points inwards
  offset = np.asarray(points, np.float64)[:, None, :] - start[None]
  signed = np.einsum("ped,ed->pe", offset, normal)
  return bool(np.all(signed >= -slack))


# ----------------------------------------------------------- fixed points ---

def test_fixed_points_are_convex_combinations_inside_the_hull(blob):
  result = theory.reconstruction_fixed_points(blob, 0.02, grid_size=GRID,
                                              **TIGHT)
  assert result.converged
  weights = result.weights.astype(np.float64)
  assert weights.shape == (len(blob), GRID * GRID)
  assert np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
  # M is a fixed point of F: the weighted means of the data ...
  decoder = weights / weights.sum(axis=0, keepdims=True)
  np.testing.assert_allclose(decoder.T @ blob, result.reconstructions,
                             atol=1e-4)
  # ... with weights forming a convex combination, so inside the hull.
  assert np.all(decoder >= 0)
  np.testing.assert_allclose(decoder.sum(axis=0), 1.0, atol=1e-6)
  assert _inside_hull(result.reconstructions, blob, slack=1e-4)
  assert _inside_hull(result.fixed_points, blob, slack=1e-4)
  assert 1 < len(result.fixed_points) < GRID * GRID
  # Sanity of the hull test itself: tile centres outside the data fail it.
  assert not _inside_hull(result.latent_centres, blob, slack=1e-4)


def test_large_beta_collapses_every_tile_to_the_data_mean(clusters):
  data, _ = clusters
  result = theory.reconstruction_fixed_points(data, 50.0, grid_size=GRID)
  np.testing.assert_allclose(result.reconstructions,
                             np.broadcast_to(data.mean(0), (GRID**2, 2)),
                             atol=2e-3)
  assert len(result.fixed_points) == 1
  np.testing.assert_array_equal(result.tile_labels, 0)
  # E is then the total variance of the data.
  np.testing.assert_allclose(result.reconstruction_error,
                             data.var(axis=0).sum(), rtol=1e-3)


def test_small_beta_one_fixed_point_per_separated_cluster(clusters):
  data, component = clusters
  result = theory.reconstruction_fixed_points(data, 0.003, grid_size=GRID)
  assert len(result.fixed_points) == 4
  means = np.stack([data[component == k].mean(0) for k in range(4)])
  distance = np.linalg.norm(result.fixed_points[:, None] - means[None], axis=-1)
  # A one-to-one match, each fixed point at its cluster's mean.
  assert sorted(distance.argmin(axis=1)) == [0, 1, 2, 3]
  assert distance.min(axis=1).max() < 2e-3


def test_sweep_fixed_points_never_increase_with_beta(clusters):
  data, _ = clusters
  betas = np.geomspace(1e-3, 1.0, 24)
  sweep = theory.fixed_point_sweep(data, betas, grid_size=GRID, **TIGHT)
  assert sweep.converged.all()
  counts = sweep.num_fixed_points
  assert np.all(np.diff(counts) <= 0), counts
  assert counts[0] == 4 and counts[-1] == 1 and 2 in counts
  # E(beta) grows with beta (more blur as fixed points merge).
  assert np.all(np.diff(sweep.reconstruction_error) > -1e-6)
  assert [len(f) for f in sweep.fixed_points] == list(counts)
  # The sweep is the single run, beta by beta (same start, same map).
  one = theory.reconstruction_fixed_points(data, betas[11], grid_size=GRID,
                                           **TIGHT)
  np.testing.assert_allclose(sweep.reconstructions[11], one.reconstructions,
                             atol=1e-5)
  assert sweep.iterations[11] == one.iterations
  np.testing.assert_allclose(sweep.reconstruction_error[11],
                             one.reconstruction_error, rtol=1e-5)
  # Vectorised in batches of 2 (vmapped while loops, a ragged last batch).
  batched = theory.fixed_point_sweep(data, betas[9:14], grid_size=GRID,
                                     batch_size=2, **TIGHT)
  np.testing.assert_allclose(batched.reconstructions,
                             sweep.reconstructions[9:14], atol=1e-4)
  np.testing.assert_array_equal(batched.num_fixed_points,
                                counts[9:14])
  np.testing.assert_array_equal(batched.iterations, sweep.iterations[9:14])


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_two_clusters_merge_at_the_predicted_critical_beta(sigma):
  # Linearising F about the collapsed state M_k = mean gives
  # M_k - mean -> (2 C / T)(M_k - mean - average), so the collapse is stable
  # iff T > 2 lambda_max(C): beta_c = lambda_max / sigma^2.
  out = mixture_of_gaussians(40, centres=[[-0.3, 0.1], [0.3, 0.1]], std=0.02,
                             seed=2)
  data = out["points"].astype(np.float64)
  critical = np.linalg.eigvalsh(np.cov(data.T, bias=True)).max() / sigma**2
  below, above = (theory.reconstruction_fixed_points(
      data, factor * critical, sigma=sigma, grid_size=GRID, **TIGHT)
                  for factor in (0.8, 1.25))
  assert below.converged and above.converged
  assert len(below.fixed_points) == 2 and len(above.fixed_points) == 1
  np.testing.assert_allclose(below.temperature, 2 * sigma**2 * below.beta)


def test_trajectories_match_the_loop(blob):
  plain = theory.reconstruction_fixed_points(blob, 0.05, grid_size=GRID)
  traced = theory.reconstruction_fixed_points(blob, 0.05, grid_size=GRID,
                                              return_trajectories=True)
  assert plain.trajectories is None and plain.converged
  path = traced.trajectories
  assert path.shape == (traced.iterations + 1, GRID * GRID, 2)
  assert traced.iterations == plain.iterations
  assert traced.converged == plain.converged
  np.testing.assert_allclose(path[-1], plain.reconstructions, atol=1e-5)
  # The first frame is the start: tile centres plus noise of at most 1e-2.
  assert np.abs(path[0] - traced.latent_centres).max() <= 1e-2 + 1e-6
  steps = np.linalg.norm(np.diff(path, axis=0), axis=-1).max(axis=1)
  assert steps[-1] < 1e-3 <= steps[:-1].min()


def test_a_geco_multiplier_is_a_temperature(blob):
  # GECO's RE Lagrangian, KL + lambda E[||x - g||^2 - kappa^2], iterated in
  # NumPy with its own exponent -lambda C (kappa included), against the
  # beta-VAE map at beta_from_multiplier(lambda): the same reconstructions.
  lam, kappa, sigma = 3.0, 0.4, 0.7
  beta = theory.beta_from_multiplier(lam, sigma=sigma)
  assert beta == pytest.approx(1.0 / (2 * sigma ** 2 * lam))
  init = np.random.default_rng(1).uniform(-1, 1, size=(GRID * GRID, 2))
  got = theory.reconstruction_fixed_points(
      blob, beta, sigma=sigma, grid_size=GRID, smoothing=1.0, max_iters=4, tol=0.0,
      init=init, init_noise=0.0)
  m = init.copy()
  for _ in range(4):
    c = np.sum((blob[:, None, :] - m[None]) ** 2, axis=-1) - kappa ** 2   # [N, K]
    w = np.exp(-lam * c)                 # uniform prior: pi_k cancels
    w /= w.sum(axis=1, keepdims=True)
    m = (w.T @ blob) / w.sum(axis=0)[:, None]
  assert got.iterations == 4
  np.testing.assert_allclose(got.reconstructions, m, atol=2e-5)
  np.testing.assert_allclose(theory.beta_from_multiplier(np.array([1.0, 4.0])),
                             [0.5, 0.125])
  for bad in (0.0, -1.0, np.inf, "x"):
    with pytest.raises(ValueError, match="multiplier"):
      theory.beta_from_multiplier(bad)


def test_max_iters_and_tiles_without_prior_mass(blob):
  prior = np.ones(GRID * GRID)
  prior[: GRID * GRID // 2] = 0.0                 # the lower half of the grid
  result = theory.reconstruction_fixed_points(
      blob, 0.05, grid_size=GRID, prior=prior, max_iters=7,
      return_trajectories=True)
  assert result.iterations == 7 and not result.converged
  assert result.trajectories.shape == (8, GRID * GRID, 2)
  dead = slice(0, GRID * GRID // 2)
  # Tiles of mass 0 have no posterior weight and keep their start.
  assert np.all(result.weights[:, dead] == 0)
  np.testing.assert_array_equal(result.reconstructions[dead],
                                result.trajectories[0, dead])
  assert np.all(np.isfinite(result.reconstructions))
  np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-5)


def test_deterministic_and_seeded(blob):
  first = theory.reconstruction_fixed_points(blob, 0.05, grid_size=GRID)
  again = theory.reconstruction_fixed_points(blob, 0.05, grid_size=GRID)
  np.testing.assert_array_equal(first.reconstructions, again.reconstructions)
  other = theory.reconstruction_fixed_points(blob, 0.05, grid_size=GRID,
                                             seed=1, max_iters=1)
  assert not np.array_equal(first.reconstructions, other.reconstructions)


def test_higher_dimensional_data_and_gaussian_prior(clusters):
  data, component = clusters
  lifted = np.concatenate([data, 0.5 * data[:, :1]], axis=1)   # D = 3
  result = theory.reconstruction_fixed_points(lifted, 0.01, grid_size=GRID,
                                              prior="gaussian")
  assert result.reconstructions.shape == (GRID * GRID, 3)
  assert len(result.fixed_points) == 4
  prior = theory.tile_prior(GRID, prior="gaussian")
  np.testing.assert_allclose(prior.sum(), 1.0)
  grid = prior.reshape(GRID, GRID)
  np.testing.assert_allclose(grid, grid.T)
  np.testing.assert_allclose(grid, grid[::-1, ::-1])
  assert grid[GRID // 2, GRID // 2] > grid[0, 0]


# ---------------------------------------------------- critical temperatures ---

@pytest.mark.parametrize("grid", ["linear", "geometric"])
def test_critical_temperatures_find_the_kinks(grid):
  kinks = np.array([0.2, 0.45, 0.75])
  slopes = np.array([0.05, 1.0, 0.2, 1.5])
  if grid == "linear":
    betas = np.linspace(0.01, 1.0, 150)
  else:
    betas = np.geomspace(0.05, 1.0, 150)
  errors = slopes[0] * betas
  for kink, change in zip(kinks, np.diff(slopes)):
    errors = errors + change * np.maximum(betas - kink, 0.0)
  noisy = errors + 2e-4 * np.random.default_rng(0).standard_normal(len(betas))
  shuffled = np.random.default_rng(1).permutation(len(betas))
  found = theory.critical_temperatures(betas[shuffled], noisy[shuffled],
                                       top_k=3, smooth=2.0)
  assert found.betas.shape == (3,)
  assert np.all(np.diff(found.heights) <= 0)        # highest first
  spacing = np.max(np.diff(betas))
  np.testing.assert_allclose(np.sort(found.betas), kinks, atol=3 * spacing)
  if grid == "linear":
    # The biggest slope change (at 0.75: |0.2 - 1.5|) is the highest peak.
    # (On the geometric grid the kernel, a fixed number of median spacings,
    # is narrower at small beta, so the kink at 0.2 stands out more.)
    assert abs(found.betas[0] - 0.75) <= 3 * spacing
  assert found.curvature.shape == betas.shape
  np.testing.assert_allclose(found.sorted_betas, betas)


def test_critical_temperatures_over_decades():
  # Kinks a decade apart on a geometric grid; the largest slope change is at
  # the largest beta. E is linear between the kinks, so a second derivative in
  # log beta (which is beta * dE/dbeta there, not 0) would see bends, not
  # kinks; in beta, smoothed in log beta and ranked by beta |E''|, the three
  # kinks come out, largest slope change first.
  kinks = np.array([0.3, 1.0, 3.0])
  changes = np.array([1.0, -0.5, 1.5])
  betas = np.geomspace(0.05, 20.0, 160)
  errors = 0.2 * betas
  for kink, change in zip(kinks, changes):
    errors = errors + change * np.maximum(betas - kink, 0.0)
  found = theory.critical_temperatures(betas, errors, top_k=3, smooth=2.0,
                                       log_beta=True)
  ratio = betas[1] / betas[0]
  np.testing.assert_allclose(np.sort(found.betas), kinks, rtol=3 * (ratio - 1))
  assert abs(found.betas[0] / 3.0 - 1) <= 3 * (ratio - 1)
  assert abs(found.betas[1] / 0.3 - 1) <= 3 * (ratio - 1)
  # Heights in proportion to the slope changes (a Gaussian of the same width
  # in log beta at each kink): 1.5 : 1.0 : 0.5.
  np.testing.assert_allclose(found.heights / found.heights[0], [1.0, 2 / 3, 1 / 3],
                             rtol=0.1)
  # The second derivative is in beta: ~0 away from the kinks.
  far = (betas > 1.5) & (betas < 2.0)
  assert np.max(np.abs(found.second_derivative[far])) < 1e-3


def test_critical_temperatures_of_a_sweep(clusters):
  data, _ = clusters
  betas = np.linspace(0.01, 1.0, 45)
  sweep = theory.fixed_point_sweep(data, betas, grid_size=GRID, **TIGHT)
  found = theory.critical_temperatures(betas, sweep.reconstruction_error,
                                       top_k=1)
  # The highest kink is where the two pairs finish merging: between the
  # last beta with 2 fixed points and the first with 1 (give or take the
  # smoothing width of about one grid step).
  step = betas[1] - betas[0]
  last_two = betas[sweep.num_fixed_points >= 2].max()
  assert sweep.num_fixed_points[-1] == 1
  assert last_two - step <= found.betas[0] <= last_two + 2 * step


# --------------------------------------------------------------- Lipschitz ---

@pytest.mark.parametrize("kind", ["local", "global"])
def test_lipschitz_projection_properties(kind):
  omega = theory.lipschitz_weights(GRID, kind=kind)
  np.testing.assert_array_equal(omega, omega.T)
  assert np.all(np.diag(omega) == 0) and np.all(omega >= 0)
  projection = theory.lipschitz_projection(GRID, kind=kind, strength=2.0)
  np.testing.assert_allclose(projection, projection.T, atol=1e-12)
  np.testing.assert_allclose(projection.sum(axis=1), 1.0, atol=1e-10)
  assert projection.min() >= -1e-12
  eigenvalues = np.linalg.eigvalsh(projection)
  assert eigenvalues.min() > 0 and eigenvalues.max() <= 1 + 1e-10
  np.testing.assert_allclose(
      theory.lipschitz_projection(GRID, kind=kind, strength=0.0),
      np.eye(GRID * GRID), atol=1e-12)


@pytest.mark.parametrize("kind", ["local", "global"])
def test_lipschitz_projection_minimises_the_documented_penalty(kind):
  # P F is the minimiser of ||M - F||^2 + gamma sum_{k<l} Omega_kl ||M_k - M_l||^2
  # (each pair counted once): its gradient, written out pair by pair, is 0
  # there, and moving away in any direction costs more.
  grid, gamma = 4, 0.7
  omega = theory.lipschitz_weights(grid, kind=kind)
  projection = theory.lipschitz_projection(grid, kind=kind, strength=gamma)
  rng = np.random.default_rng(0)
  target = rng.normal(size=(grid * grid, 3))
  best = projection @ target

  def energy(m):
    pairs = sum(omega[k, l] * np.sum((m[k] - m[l]) ** 2)
                for k in range(len(m)) for l in range(k + 1, len(m)))
    return np.sum((m - target) ** 2) + gamma * pairs

  gradient = 2 * (best - target)
  for k in range(len(best)):
    for l in range(len(best)):
      gradient[k] += 2 * gamma * omega[k, l] * (best[k] - best[l])
  np.testing.assert_allclose(gradient, 0.0, atol=1e-10)
  for _ in range(5):
    assert energy(best + 1e-3 * rng.normal(size=best.shape)) > energy(best)
  np.testing.assert_allclose(theory.neighbour_energy(best, omega),
                             (energy(best) - np.sum((best - target) ** 2)) / gamma,
                             rtol=1e-10)


def test_local_weights_count_neighbours():
  h = 2.0 / GRID
  edge = theory.lipschitz_weights(GRID, kind="local", radius=h)
  king = theory.lipschitz_weights(GRID, kind="local")          # 1.5 h
  inner = (GRID // 2) * GRID + GRID // 2
  assert edge[inner].sum() == 4 and king[inner].sum() == 8
  assert edge[0].sum() == 2 and king[0].sum() == 3            # a corner
  far = theory.lipschitz_weights(GRID, kind="global")
  np.testing.assert_allclose(far[inner, inner + 1], 1.0)
  np.testing.assert_allclose(far[inner, inner + GRID + 1], 0.5)


def test_stronger_lipschitz_never_increases_neighbour_distances():
  omega = theory.lipschitz_weights(GRID, kind="local")
  means = np.random.default_rng(0).standard_normal((GRID * GRID, 2))
  energies = [theory.neighbour_energy(
      theory.lipschitz_projection(GRID, kind="local", strength=s) @ means,
      omega) for s in (0.0, 0.1, 0.5, 2.0, 10.0)]
  assert np.all(np.diff(energies) <= 1e-12), energies
  # The same holds for the fixed points on a mixture of lines.
  lines = mixture_of_lines(60, seed=0)["points"]
  at_fixed_points = []
  for strength in (0.0, 0.5, 4.0):
    projection = theory.lipschitz_projection(GRID, kind="local",
                                             strength=strength)
    result = theory.reconstruction_fixed_points(
        lines, 0.005, grid_size=GRID, lipschitz=projection, max_iters=1000)
    assert _inside_hull(result.reconstructions, lines, slack=1e-4)
    at_fixed_points.append(theory.neighbour_energy(result.reconstructions,
                                                   omega))
  assert np.all(np.diff(at_fixed_points) <= 0), at_fixed_points


# ----------------------------------------------------------- equipartition ---

EQUI_POINTS = np.array([[-0.6, -0.5], [0.7, -0.2], [0.1, 0.6], [-0.3, 0.2],
                        [0.5, 0.5]])


@pytest.mark.parametrize("prior", ["uniform", "gaussian"])
def test_equipartition_tends_to_one_over_n(prior):
  n = len(EQUI_POINTS)
  deviations = []
  for grid_size in (4, 8, 16):
    start, owner = theory.equiprobable_reconstructions(
        EQUI_POINTS, grid_size=grid_size, prior=prior)
    result = theory.reconstruction_fixed_points(
        EQUI_POINTS, 1e-3, grid_size=grid_size, prior=prior, init=start)
    assert len(result.fixed_points) == n
    mass = theory.posterior_prior_mass(result)
    np.testing.assert_allclose(mass.sum(), 1.0)
    np.testing.assert_allclose(theory.posterior_prior_mass(result, soft=True),
                               mass, atol=1e-6)
    deviation = np.abs(mass - 1.0 / n).max()
    assert deviation <= result.prior.max() + 1e-12
    deviations.append(deviation)
    # Prop. 3.1: the equiprobable partition has the higher ELBO, with the
    # KL at its floor log N; the grid start keeps its unequal Voronoi cells.
    grid = theory.reconstruction_fixed_points(
        EQUI_POINTS, 1e-3, grid_size=grid_size, prior=prior)
    if grid_size >= 8:
      assert theory.tiled_elbo(EQUI_POINTS, result).elbo > theory.tiled_elbo(
          EQUI_POINTS, grid).elbo
      assert np.abs(theory.posterior_prior_mass(grid) - 1 / n).max() > 0.05
  assert deviations[-1] < deviations[0] and deviations[-1] < 0.01
  kl = theory.tiled_elbo(EQUI_POINTS, result).kl
  assert np.log(n) - 1e-6 <= kl < np.log(n) + 1e-3


def test_small_beta_posterior_is_the_prior_restricted_to_its_tiles():
  result = theory.reconstruction_fixed_points(EQUI_POINTS, 1e-3,
                                              grid_size=GRID,
                                              prior="gaussian")
  mass = theory.posterior_prior_mass(result)
  owner = np.argmax(result.weights, axis=0)
  for i in range(len(EQUI_POINTS)):
    restricted = np.where(owner == i, result.prior, 0.0) / mass[i]
    np.testing.assert_allclose(result.weights[i], restricted, atol=1e-4)


# -------------------------------------------------------------- bad inputs ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(data=np.zeros(5)), "2-D"),
    (dict(data=np.zeros((2, 3, 2))), "2-D"),
    (dict(data=[[0.0, np.inf]]), "finite"),
    (dict(grid_size=0), "grid_size"),
    (dict(grid_size=2.5), "grid_size"),
    (dict(sigma=0.0), "sigma"),
    (dict(smoothing=0.0), "smoothing"),
    (dict(smoothing=1.5), "smoothing"),
    (dict(max_iters=0), "max_iters"),
    (dict(tol=-1.0), "tol"),
    (dict(prior="laplace"), "prior"),
    (dict(latent_range=(1.0, -1.0)), "latent_range"),
    (dict(lipschitz=np.eye(3)), "lipschitz"),
    (dict(init=np.zeros((3, 2))), "init"),
])
def test_bad_inputs_raise_value_error(kwargs, message):
  args = dict(data=EQUI_POINTS, beta=0.1, grid_size=4)
  args.update(kwargs)
  data, beta = args.pop("data"), args.pop("beta")
  with pytest.raises(ValueError, match=message):
    theory.reconstruction_fixed_points(data, beta, **args)


def test_bad_inputs_of_the_other_functions():
  with pytest.raises(ValueError, match="betas"):
    theory.fixed_point_sweep(EQUI_POINTS, [], grid_size=4)
  with pytest.raises(ValueError, match="beta"):
    theory.fixed_point_sweep(EQUI_POINTS, [0.1, 0.0], grid_size=4)
  with pytest.raises(ValueError, match="same length"):
    theory.critical_temperatures([0.1, 0.2, 0.3], [1.0, 2.0])
  with pytest.raises(ValueError, match="distinct"):
    theory.critical_temperatures([0.1, 0.1, 0.3], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="top_k"):
    theory.critical_temperatures([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], top_k=0)
  with pytest.raises(ValueError, match="kind"):
    theory.lipschitz_projection(4, kind="diagonal")
  with pytest.raises(ValueError, match="strength"):
    theory.lipschitz_projection(4, strength=-1.0)
  with pytest.raises(ValueError, match="radius"):
    theory.lipschitz_weights(4, kind="global", radius=0.5)
  with pytest.raises(ValueError, match="FixedPoints"):
    theory.posterior_prior_mass(np.zeros((3, 4)))


# -------------------------------------------------------------- experiment ---

def test_phase_transitions_experiment_smoke(tmp_path, capsys):
  from experiments import phase_transitions
  assert phase_transitions.main(
      ["--outdir", str(tmp_path), "--grid_size", "8", "--num_points", "40",
       "--num_betas", "12"]) == 0
  printed = capsys.readouterr().out
  assert "critical temperatures" in printed and "wall time" in printed
  for name in ("fig2_phase_transitions.png", "fig7_lipschitz.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
