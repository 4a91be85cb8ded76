"""Theory made executable: sections 3.1-3.3 and appendices A-C of "Taming VAEs".

* ``reconstruction_fixed_points`` / ``fixed_point_sweep``: the tiled
  fixed-point map of a high-capacity beta-VAE (Prop. 3.2, Appendix A), one
  compiled loop, vectorised over beta; ``beta_from_multiplier`` gives the
  beta of GECO's RE Lagrangian at a multiplier lambda (``1 / (2 sigma^2 lambda)``).
* ``critical_temperatures``: the peaks of ``|d^2 E / d beta^2|`` (Fig. 2).
* ``lipschitz_projection``: local and global Lipschitz constraints as the
  projection ``P = (I + gamma L)^-1`` after each step (Appendix B, Fig. 7).
* ``posterior_prior_mass``, ``tiled_elbo``, ``equiprobable_reconstructions``:
  the equipartition of the prior among the posteriors (Props. 3.1, 3.3).

``docs/theory.md`` has the derivations and the figures.
"""

from geco_jax.theory.equipartition import ElboTerms
from geco_jax.theory.equipartition import equiprobable_reconstructions
from geco_jax.theory.equipartition import posterior_prior_mass
from geco_jax.theory.equipartition import tiled_elbo
from geco_jax.theory.fixed_points import FixedPoints
from geco_jax.theory.fixed_points import beta_from_multiplier
from geco_jax.theory.fixed_points import FixedPointSweep
from geco_jax.theory.fixed_points import fixed_point_sweep
from geco_jax.theory.fixed_points import merge_fixed_points
from geco_jax.theory.fixed_points import reconstruction_fixed_points
from geco_jax.theory.lipschitz import graph_laplacian
from geco_jax.theory.lipschitz import lipschitz_projection
from geco_jax.theory.lipschitz import lipschitz_weights
from geco_jax.theory.lipschitz import neighbour_energy
from geco_jax.theory.phase import CriticalTemperatures
from geco_jax.theory.phase import critical_temperatures
from geco_jax.theory.phase import smooth_curve
from geco_jax.theory.tiles import tile_centres
from geco_jax.theory.tiles import tile_prior

__all__ = [
    "CriticalTemperatures",
    "ElboTerms",
    "FixedPointSweep",
    "FixedPoints",
    "beta_from_multiplier",
    "critical_temperatures",
    "equiprobable_reconstructions",
    "fixed_point_sweep",
    "graph_laplacian",
    "lipschitz_projection",
    "lipschitz_weights",
    "merge_fixed_points",
    "neighbour_energy",
    "posterior_prior_mass",
    "reconstruction_fixed_points",
    "smooth_curve",
    "tiled_elbo",
    "tile_centres",
    "tile_prior",
]
