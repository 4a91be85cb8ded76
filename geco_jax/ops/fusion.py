r"""A fusion barrier for a recurrence's backward pass on XLA:CPU.

``cotangent_barrier(x)`` is the identity, in value and in gradient. What it
changes is how XLA:CPU compiles the backward pass: the cotangent that flows
back into ``x`` is materialised in memory as one array, so XLA cannot fuse
the elementwise chain that produces it into the fusions that consume it.

Why: an LSTM's cell state carries its gradient back through time with
elementwise work only,

  dc_{t-1} = dc_t * sigmoid(f_t) + (dh_{t-1} * sigmoid(o_{t-1})) * tanh'(c_{t-1}),

so in an unrolled recurrence nothing forces dc_t into memory. XLA:CPU's loop
fusion duplicates cheap elementwise producers into every consumer, and each
step's gate gradients end up recomputing the chain from the last step down
to their own: quadratic in the number of steps. In ConvDraw's mnist_cpu
training step (T = 8) this was 0.23 GFLOP of recomputed elementwise work
(37.95 -> 37.73 GFLOP in XLA's count), in fusions of up to 54 operands; with
the barrier on the cell state the step ran 10-13% faster
(docs/performance.md, lever 33).

How: a ``custom_jvp`` routes the tangent through a ``lax.cond`` whose
predicate is always true but is computed at run time from x (the bits of
its sum, | 1, != 0), so XLA can neither fold the conditional away nor fuse
across it; the false branch (a negation) never runs. Both branches are
linear, so forward mode works, and reverse mode transposes it into the same
conditional on the cotangent: the backward pass materialises it, while the
forward pass has no conditional at all.
``jax.lax.optimization_barrier`` does not do this on XLA:CPU (it is expanded
before fusion), and neither does dividing by a run-time one (the divide is
fused and duplicated too). Only on the CPU: on other platforms it lowers to
the plain identity (``lax.platform_dependent``), since an accelerator's
conditional waits for its predicate on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["cotangent_barrier"]

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _always(x: jax.Array) -> jax.Array:
  """True, computed at run time from ``x``: (bits of sum(x) | 1) != 0.

  A sum rather than one element: slicing an element out of a sharded
  dimension is an error under explicit sharding, a reduction is not (it
  costs one read of x, and one all-reduce of a scalar when x is sharded).
  """
  total = jnp.sum(x)
  bits = lax.bitcast_convert_type(total, _UNSIGNED[total.dtype.itemsize])
  return (bits | jnp.ones((), bits.dtype)) != 0


def _materialised(x: jax.Array, t: jax.Array) -> jax.Array:
  """``t`` through a conditional XLA cannot remove; linear in ``t``, so its
  transpose is the same conditional on the cotangent."""
  return lax.cond(_always(x), lambda t: t, lambda t: -t, t)


@jax.custom_jvp
def cotangent_barrier(x: jax.Array) -> jax.Array:
  """The identity; its cotangent is materialised on XLA:CPU (see the module docstring)."""
  return x


@cotangent_barrier.defjvp
def _jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  if x.size == 0:
    return x, t
  return x, lax.platform_dependent(x, t, cpu=_materialised, default=lambda x, t: t)
