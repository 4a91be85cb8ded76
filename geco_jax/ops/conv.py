r"""A stride-1 VALID convolution whose kernel gradient XLA:CPU computes as dots.

``valid_convolution(x, kernel)`` is
``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')`` with NHWC inputs, an
HWIO kernel and NHWC outputs,

  y[n, p, q, o] = sum_{i, j, c} x[n, p + i, q + j, c] k[i, j, c, o],

in value and in every derivative. What differs is how XLA:CPU computes the
kernel gradient of a training step,

  dL/dk[i, j, c, o] = sum_{n, p, q} x[n, p + i, q + j, c] g[n, p, q, o],

with g = dL/dy. XLA rewrites it as a convolution whose batch is c and whose
kernel is g (spatially as large as y). For the small, wide-kernel
convolutions of ``SubpixelConvTranspose`` (2 x 2 windows, images of 8 x 8 to
16 x 16, batch 64), XLA:CPU's YNNPACK runs that convolution at 10-35 GF/s:
8.5 ms of VAE+NVP's 35 ms training step went to one of them
(docs/performance.md, lever 34). The same sums as kh * kw matrix products
over m = n * ho * wo run at matmul speed. Two forms, chosen by which copies
less:

- slices (``ho wo c <= H W o``): dk[i, j] = X_ij^T g, with X_ij the c x m
  matrix of x[:, i : i + ho, j : j + wo] (one copy of x's window per tap);
- shifts (few output channels): dk[i, j, :, o] = x^T G_ij, one dot of the
  c x (n H W) matrix of x with all kh * kw * o channels of G, where G_ij is
  g placed at offset (i, j) in x's frame, zero elsewhere (one copy of g per
  tap; (H W) / (ho wo) more multiplications).

How: a ``custom_jvp`` whose tangent in ``k`` is written as those products
(the same linear map of dk as the convolution), so reverse mode transposes it
into exactly these dots; the tangent in ``x``, the primal and, on every
platform other than the CPU (``lax.platform_dependent``), the tangent in ``k``
stay XLA's convolution. Forward mode and higher derivatives work; in forward
mode on the CPU the tangent in ``k`` costs the products above rather than one
convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["valid_convolution"]

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=_DIMENSIONS)


def _check(x: jax.Array, kernel: jax.Array) -> None:
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"valid_convolution takes x [batch, height, width, channels] and "
                     f"kernel [height, width, in, out]; got shapes {x.shape} and "
                     f"{kernel.shape}.")
  if kernel.shape[2] != x.shape[3]:
    raise ValueError(f"valid_convolution: the kernel's input channels ({kernel.shape[2]}) "
                     f"differ from x's channels ({x.shape[3]}).")
  if kernel.shape[0] > x.shape[1] or kernel.shape[1] > x.shape[2]:
    raise ValueError(f"valid_convolution: a {kernel.shape[0]} x {kernel.shape[1]} kernel "
                     f"does not fit in a {x.shape[1]} x {x.shape[2]} image.")


def _kernel_tangent_by_slices(x: jax.Array, dk: jax.Array) -> jax.Array:
  """sum_{i,j} X_ij dk[i, j]: transposed, dk[i, j] = X_ij^T g, one dot per tap."""
  kh, kw, c, o = dk.shape
  n, height, width, _ = x.shape
  ho, wo = height - kh + 1, width - kw + 1
  xt = x.transpose(3, 0, 1, 2)                                   # [c, n, H, W]
  out = None
  for i in range(kh):
    for j in range(kw):
      # Contracting c of [c, m] and [c, o]: the transpose contracts m of
      # [c, m] and [m, o], the dot XLA:CPU runs fastest. (Contracting
      # (n, ho, wo) without the reshapes computes the same, but XLA then
      # transposes g and runs a slower dot: lever 34.) Merging the batch
      # dimension into m, and splitting it back, is allowed under explicit
      # sharding (tests/test_ops_conv.py).
      window = xt[:, :, i:i + ho, j:j + wo].reshape(c, n * ho * wo)
      term = lax.dot_general(window, dk[i, j], (((0,), (0,)), ((), ())))
      out = term if out is None else out + term
  return out.reshape(n, ho, wo, o)


def _kernel_tangent_by_shifts(x: jax.Array, dk: jax.Array) -> jax.Array:
  """Z = dk^T x (all taps at once, in x's frame), then sum_{i,j} Z_ij shifted by
  (i, j): transposed, one dot of G (g shifted per tap) with x."""
  kh, kw, c, o = dk.shape
  _, height, width, _ = x.shape
  ho, wo = height - kh + 1, width - kw + 1
  rows = dk.transpose(0, 1, 3, 2).reshape(kh * kw * o, c)        # [(i, j, o), c]
  # x stays 4-D: splitting a batch-sharded n * H * W back into (n, H, W) is
  # refused under explicit sharding.
  z = lax.dot_general(rows, x, (((1,), (3,)), ((), ())))         # [(i, j, o), n, H, W]
  z = z.reshape(kh, kw, o, *z.shape[1:])
  out = None
  for i in range(kh):
    for j in range(kw):
      term = z[i, j, :, :, i:i + ho, j:j + wo]
      out = term if out is None else out + term
  return out.transpose(1, 2, 3, 0)


def _kernel_tangent_by_dots(x: jax.Array, dk: jax.Array) -> jax.Array:
  kh, kw, c, o = dk.shape
  _, height, width, _ = x.shape
  ho, wo = height - kh + 1, width - kw + 1
  if ho * wo * c <= height * width * o:
    return _kernel_tangent_by_slices(x, dk)
  return _kernel_tangent_by_shifts(x, dk)


@jax.custom_jvp
def valid_convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID')``, NHWC x HWIO -> NHWC.

  Args:
    x: [batch, height, width, in].
    kernel: [kh, kw, in, out], with kh <= height and kw <= width.

  Returns:
    [batch, height - kh + 1, width - kw + 1, out]. Its kernel gradient is
    computed as matrix products on the CPU (see the module docstring).
  """
  _check(x, kernel)
  return _convolution(x, kernel)


def _jvp(primals, tangents):
  x, kernel = primals
  dx, dk = tangents
  _check(x, kernel)
  y = _convolution(x, kernel)
  out = None
  if not isinstance(dx, SymbolicZero):
    out = _convolution(dx, kernel)
  if not isinstance(dk, SymbolicZero) and y.size:
    term = lax.platform_dependent(x, dk, cpu=_kernel_tangent_by_dots, default=_convolution)
    out = term if out is None else out + term
  if out is None:
    out = jnp.zeros_like(y)
  return y, out


valid_convolution.defjvp(_jvp, symbolic_zeros=True)
