"""Tests of geco_jax.data.mixtures: shapes, geometry, noise, weights, errors."""

import numpy as np
import pytest

from geco_jax.data.mixtures import default_gaussian_centres
from geco_jax.data.mixtures import mixture_of_circles
from geco_jax.data.mixtures import mixture_of_gaussians
from geco_jax.data.mixtures import mixture_of_lines

MIXTURES = (mixture_of_gaussians, mixture_of_lines, mixture_of_circles)
DEFAULT_COMPONENTS = {mixture_of_gaussians: 8, mixture_of_lines: 3,
                      mixture_of_circles: 2}
N = 40000


@pytest.mark.parametrize("mixture", MIXTURES, ids=lambda f: f.__name__)
def test_shapes_dtypes_and_default_range(mixture):
  out = mixture(N)
  assert set(out) == {"points", "component"}
  assert out["points"].shape == (N, 2) and out["points"].dtype == np.float32
  assert out["component"].shape == (N,)
  assert out["component"].dtype == np.int32
  assert set(np.unique(out["component"])) == set(
      range(DEFAULT_COMPONENTS[mixture]))
  assert np.all(np.abs(out["points"]) < 1.0)


@pytest.mark.parametrize("mixture", MIXTURES, ids=lambda f: f.__name__)
def test_deterministic_prefix_and_seed(mixture):
  first = mixture(500, seed=3)
  again = mixture(500, seed=3)
  longer = mixture(800, seed=3)
  other = mixture(500, seed=4)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
    np.testing.assert_array_equal(first[name], longer[name][:500])
  assert not np.array_equal(first["points"], other["points"])


def _assert_weights(component, weights):
  weights = np.asarray(weights)
  counts = np.bincount(component, minlength=weights.size)
  sigma = np.sqrt(component.size * weights * (1 - weights))
  assert np.all(np.abs(counts - component.size * weights) <= 5 * sigma + 1e-9)


# ---------------------------------------------------------------- Gaussians ---

def test_default_gaussian_centres():
  centres = default_gaussian_centres()
  assert centres.shape == (8, 2)
  np.testing.assert_allclose(np.hypot(*centres.T), 0.75)
  np.testing.assert_allclose(centres[0], [0.75, 0.0])
  np.testing.assert_allclose(centres[2], [0.0, 0.75], atol=1e-15)


def test_gaussian_means_stds_and_weights():
  centres = np.array([[-0.5, -0.5], [0.5, 0.0], [0.0, 0.6]])
  std = np.array([0.02, 0.05, 0.1])
  weights = np.array([0.5, 0.3, 0.2])
  out = mixture_of_gaussians(N, centres=centres, std=std, weights=weights,
                             seed=1)
  points, component = out["points"], out["component"]
  _assert_weights(component, weights)
  for k in range(3):
    mine = points[component == k].astype(np.float64)
    n = len(mine)
    np.testing.assert_allclose(mine.mean(axis=0), centres[k],
                               atol=5 * std[k] / np.sqrt(n))
    np.testing.assert_allclose(mine.std(axis=0), std[k], rtol=0.05)
    # Isotropic: the coordinates are uncorrelated.
    assert abs(np.corrcoef(mine.T)[0, 1]) < 5 / np.sqrt(n)


def test_gaussian_default_and_zero_std():
  out = mixture_of_gaussians(N, seed=2)
  centres = default_gaussian_centres()
  _assert_weights(out["component"], np.full(8, 1 / 8))
  residual = out["points"] - centres[out["component"]]
  np.testing.assert_allclose(residual.std(), 0.05, rtol=0.02)
  exact = mixture_of_gaussians(100, std=0.0, seed=2)
  np.testing.assert_allclose(exact["points"],
                             centres[exact["component"]].astype(np.float32))


def test_zero_weight_components_never_appear():
  out = mixture_of_gaussians(N, centres=np.eye(2)[[0, 1, 0]] * 0.5,
                             weights=[0.0, 1.0, 0.0], seed=3)
  assert np.all(out["component"] == 1)
  out = mixture_of_lines(N, weights=[0.5, 0.5, 0.0], seed=3)
  assert set(np.unique(out["component"])) == {0, 1}


# -------------------------------------------------------------------- lines ---

@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0])
def test_lines_geometry_and_noise(angle):
  num_lines, length, spacing, noise = 4, 1.2, 0.4, 0.03
  out = mixture_of_lines(N, num_lines=num_lines, length=length,
                         spacing=spacing, angle=angle, noise=noise, seed=5)
  points = out["points"].astype(np.float64)
  component = out["component"]
  _assert_weights(component, np.full(num_lines, 1 / num_lines))
  t = np.deg2rad(angle)
  direction = np.array([np.cos(t), np.sin(t)])
  normal = np.array([-np.sin(t), np.cos(t)])
  offsets = (np.arange(num_lines) - 1.5) * spacing   # -0.6, -0.2, 0.2, 0.6
  for k in range(num_lines):
    mine = points[component == k]
    across = mine @ normal        # Gaussian about the line's offset
    along = mine @ direction      # uniform on [-length/2, length/2] + noise
    np.testing.assert_allclose(across.mean(), offsets[k], atol=0.003)
    np.testing.assert_allclose(across.std(), noise, rtol=0.05)
    np.testing.assert_allclose(along.mean(), 0.0, atol=0.02)
    np.testing.assert_allclose(along.std(),
                               np.sqrt(length**2 / 12 + noise**2), rtol=0.03)
    assert np.all(np.abs(along) < length / 2 + 6 * noise)


def test_lines_default_layout():
  out = mixture_of_lines(N, noise=0.0, seed=6)
  points, component = out["points"], out["component"]
  np.testing.assert_allclose(points[:, 1], (component - 1) * 0.6, atol=1e-6)
  assert points[:, 0].min() >= -0.8 and points[:, 0].max() <= 0.8
  assert points[:, 0].min() < -0.79 and points[:, 0].max() > 0.79


# ------------------------------------------------------------------ circles ---

def test_circles_radii_centres_and_noise():
  centres = np.array([[-0.5, 0.0], [0.5, 0.2], [0.0, -0.5]])
  radii = np.array([0.3, 0.2, 0.4])
  noise = 0.01
  weights = np.array([0.2, 0.3, 0.5])
  out = mixture_of_circles(N, centres=centres, radii=radii, noise=noise,
                           weights=weights, seed=7)
  points = out["points"].astype(np.float64)
  component = out["component"]
  _assert_weights(component, weights)
  for k in range(3):
    offset = points[component == k] - centres[k]
    distance = np.hypot(*offset.T)
    np.testing.assert_allclose(distance.mean(), radii[k], atol=0.002)
    np.testing.assert_allclose(distance.std(), noise, rtol=0.05)
    # Uniform in angle: the centre of mass is the circle's centre.
    np.testing.assert_allclose(offset.mean(axis=0), 0.0, atol=0.02)
    angle = np.arctan2(offset[:, 1], offset[:, 0])
    counts = np.histogram(angle, bins=8, range=(-np.pi, np.pi))[0]
    expected = offset.shape[0] / 8
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_circles_default_and_scalar_radius():
  out = mixture_of_circles(N, noise=0.0, seed=8)
  distance = np.hypot(*out["points"].T.astype(np.float64))
  np.testing.assert_allclose(distance, np.array([0.35, 0.8])[out["component"]],
                             atol=1e-6)
  out = mixture_of_circles(100, centres=[[0.1, 0.1], [-0.1, -0.1]], radii=0.5,
                           noise=0.0)
  offset = out["points"] - np.array([[0.1, 0.1], [-0.1, -0.1]])[
      out["component"]]
  np.testing.assert_allclose(np.hypot(*offset.T), 0.5, atol=1e-6)
  single = mixture_of_circles(100, radii=0.5)
  assert np.all(single["component"] == 0)


# ------------------------------------------------------------------- errors ---

@pytest.mark.parametrize("mixture,kwargs,match", [
    (mixture_of_gaussians, {"num_points": 0}, "num_points must be at least 1"),
    (mixture_of_gaussians, {"num_points": 1.5}, "must be an integer"),
    (mixture_of_gaussians, {"seed": -1}, "seed must be at least 0"),
    (mixture_of_gaussians, {"std": -0.1}, "std must be finite and non-neg"),
    (mixture_of_gaussians, {"std": np.inf}, "std must be finite"),
    (mixture_of_gaussians, {"std": [0.1, 0.2]}, r"std must be a scalar or"),
    (mixture_of_gaussians, {"centres": [0.0, 1.0]}, r"shape \[K, 2\]"),
    (mixture_of_gaussians, {"centres": np.zeros((0, 2))}, r"K >= 1"),
    (mixture_of_gaussians, {"centres": [[0.0, np.nan]]}, "finite"),
    (mixture_of_gaussians, {"weights": [0.5, 0.5]}, r"shape \(8,\)"),
    (mixture_of_gaussians, {"weights": [0.3] * 8}, "sum to 1"),
    (mixture_of_gaussians, {"weights": [-0.25, 0.25] + [1 / 6] * 6},
     "non-negative"),
    (mixture_of_lines, {"num_lines": 0}, "num_lines must be at least 1"),
    (mixture_of_lines, {"length": -1.0}, "length must be finite and non-neg"),
    (mixture_of_lines, {"spacing": -0.1}, "spacing must be finite"),
    (mixture_of_lines, {"noise": -0.1}, "noise must be finite"),
    (mixture_of_lines, {"angle": np.nan}, "angle must be a finite"),
    (mixture_of_lines, {"weights": [1.0]}, r"shape \(3,\)"),
    (mixture_of_circles, {"radii": [0.5, -0.1]}, "radii must be finite"),
    (mixture_of_circles, {"centres": np.zeros((3, 2))},
     r"radii must be a scalar or have shape \(3,\)"),
    (mixture_of_circles, {"radii": np.zeros((2, 2))}, "radii must be a scalar"),
    (mixture_of_circles, {"noise": -1.0}, "noise must be finite"),
    (mixture_of_circles, {"weights": [0.7, 0.7]}, "sum to 1"),
])
def test_argument_errors(mixture, kwargs, match):
  kwargs = {"num_points": 10, **kwargs}
  with pytest.raises(ValueError, match=match):
    mixture(**kwargs)
