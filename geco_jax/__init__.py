"""geco_jax: VAEs trained under explicit constraints with GECO (Rezende & Viola, 2018).

The core is an optax gradient transformation, ``geco``, whose Lagrange state
lives in the optimiser state; ``lagrangian`` builds the loss from it and
``lagrange_multiplier`` reads the multiplier back. ``constraints`` holds the
paper's constraint functions (RE, FRE, CLA, pNCC, KL), ``dual`` the
optimisers for the multiplier, ``objectives`` the ELBO baselines (fixed,
learned or GQN-annealed sigma) and ``metrics`` the paper's evaluation
(sigma-independent NLL, average and marginal KL), and ``theory`` the
paper's analysis of reconstruction fixed points, phase transitions and
Lipschitz constraints (sections 3.1-3.3, appendices A-C).
"""

from geco_jax import constraints
from geco_jax import dual
from geco_jax import metrics
from geco_jax import objectives
from geco_jax import theory
from geco_jax.geco import GecoState
from geco_jax.geco import constraint_moving_average
from geco_jax.geco import find_geco_state
from geco_jax.geco import geco
from geco_jax.geco import lagrange_multiplier
from geco_jax.geco import lagrangian

__version__ = "0.1.0"

__all__ = [
    "GecoState",
    "constraint_moving_average",
    "constraints",
    "dual",
    "find_geco_state",
    "geco",
    "lagrange_multiplier",
    "lagrangian",
    "metrics",
    "objectives",
    "theory",
]
