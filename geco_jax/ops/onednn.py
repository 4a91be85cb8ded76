r"""oneDNN convolutions for XLA:CPU, run on XLA's own thread pool (optional).

``conv2d_same(x, w)`` equals

  jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))

in value and gradients (to float rounding), computed by oneDNN, the library
behind PyTorch's CPU convolutions, through three XLA FFI custom calls:
forward y = x * w, backward data dx = dy *^T w and backward weights
dw = x^T * dy. It is what ConvDraw's ``convolutions='onednn'`` uses; on the
project's 2-core CPU it made ConvDraw's training step 6-11% faster than
XLA's own convolutions (docs/performance.md, levers 32 and 33).
``conv2d_same(x, w, 'winograd')`` computes a 3x3 one by Winograd's
F(2x2, 3x3) instead: the tiles' transforms in C++, their 16 matrix products
by oneDNN's sgemm (ConvDraw's ``convolutions='onednn_winograd'``, lever 38,
which ``convdraw.choose_convolutions`` picks on one CPU device where this
module is available: the experiments' default, ``'auto'``).
``conv2d(x, w, strides, padding)`` takes any strides and padding (oneDNN's
direct convolution): the conv VAE's and VAE+NVP's four convolutions with
``convolutions='onednn'`` (the stride-2 encoder and the decoder's stride-1
sub-pixel windows), which made their training steps 1.47x and 1.35x faster
than XLA's (lever 42; ``conv_vae.choose_convolutions``).

How it runs: each call splits its batch into one chunk per thread of XLA's
intra-op pool, runs every chunk as a single-threaded oneDNN primitive in a
task on that pool, and returns to XLA at once (an asynchronous FFI handler),
so no thread competes with XLA's. (oneDNN with its own threads was faster
alone but slowed the whole step: lever 31.) The kernel gradient sums the
chunks' partial gradients, so its rounding differs from XLA's.

Requirements (installed with geco-jax on x86-64 Linux; elsewhere
``pip install 'geco-jax[onednn]'`` where the wheels exist):
- oneDNN's OpenMP build and headers from PyPI: ``onednn-cpu-gomp`` and
  ``onednn-devel-cpu-gomp`` (oneDNN 3.2; they install ``lib/libdnnl.so`` and
  ``include/`` under the environment's prefix; ``$GECO_ONEDNN_ROOT`` points
  elsewhere);
- a C++17 compiler (``$CXX``, default ``g++``): the handlers are compiled at
  first use against jaxlib's FFI headers and cached in
  ``$GECO_JAX_CACHE`` (default ``~/.cache/geco_jax``), one build per source,
  jaxlib version and oneDNN;
- the CPU backend, float32; ``conv2d_same``: stride 1, SAME padding.

Under ``jit`` with inputs sharded over several (host) devices the values stay
right, but XLA does not partition the custom calls: it gathers the batch and
every device convolves all of it. It is meant for one CPU device, the usual
case; ``experiments`` refuses it with several.

``available()`` says whether all of that is there, and why not;
``require()`` raises ``OneDNNUnavailable`` with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ALGORITHMS", "OneDNNUnavailable", "WINOGRAD_G", "available", "build_ffi_library",
           "check_installed", "conv2d", "conv2d_same", "onednn_root", "require",
           "usable_for_step", "winograd_kernel"]

PACKAGES = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# How ``conv2d_same`` may compute: oneDNN's direct convolution, or Winograd's
# F(2x2, 3x3) with oneDNN's sgemm (3x3 kernels).
ALGORITHMS = ("direct", "winograd")
_TARGETS = {
    ("direct", "forward"): "GecoOnednnConvForward",
    ("direct", "backward_data"): "GecoOnednnConvBackwardData",
    ("direct", "backward_weights"): "GecoOnednnConvBackwardWeights",
    ("winograd", "forward"): "GecoWinogradConvForward",
    ("winograd", "backward_data"): "GecoWinogradConvBackwardData",
    ("winograd", "backward_weights"): "GecoWinogradConvBackwardWeights",
    # Any strides and padding, given as attributes (``conv2d``).
    ("window", "forward"): "GecoOnednnWindowConvForward",
    ("window", "backward_data"): "GecoOnednnWindowConvBackwardData",
    ("window", "backward_weights"): "GecoOnednnWindowConvBackwardWeights",
}
_INSTALL_HINT = ("install it with `pip install -e '.[onednn]'` (the PyPI packages "
                 f"{' and '.join(PACKAGES)}), or set GECO_ONEDNN_ROOT to a oneDNN "
                 "install with include/ and lib/")


class OneDNNUnavailable(RuntimeError):
  """oneDNN convolutions cannot run here; the message says why."""


def _candidate_roots() -> list[pathlib.Path]:
  if os.environ.get("GECO_ONEDNN_ROOT"):
    return [pathlib.Path(os.environ["GECO_ONEDNN_ROOT"])]
  roots = [sysconfig.get_paths().get("data"), sys.prefix, getattr(site, "USER_BASE", None)]
  seen, out = set(), []
  for root in roots:
    if root and root not in seen:
      seen.add(root)
      out.append(pathlib.Path(root))
  return out


def onednn_root() -> pathlib.Path:
  """The oneDNN install used: where ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so`` are."""
  tried = []
  for root in _candidate_roots():
    if ((root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file()
        and (root / "lib" / "libdnnl.so").exists()):
      return root
    tried.append(str(root))
  raise OneDNNUnavailable(
      f"oneDNN (headers and libdnnl.so) not found under {', '.join(tried)}: {_INSTALL_HINT}.")


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("GECO_JAX_CACHE")
                      or pathlib.Path.home() / ".cache" / "geco_jax")


def _compiler() -> str:
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise OneDNNUnavailable(
        f"no C++ compiler {compiler!r} on PATH to build geco_jax's oneDNN handlers "
        "(set CXX to a C++17 compiler).")
  return compiler


def check_installed() -> pathlib.Path:
  """oneDNN's root if oneDNN and a compiler are installed, else ``OneDNNUnavailable``.

  Does not start JAX (configs are checked with it before XLA's flags are set);
  ``require()`` checks the rest.
  """
  root = onednn_root()
  _compiler()
  return root


def _build(root: pathlib.Path) -> pathlib.Path:
  """The compiled handlers for this source, jaxlib and oneDNN; built once, then cached."""
  lib = root / "lib"
  # -O3: GCC 12 vectorises the Winograd transforms' loops at -O3, not at -O2.
  args = ["-O3", "-fopenmp", f"-I{root / 'include'}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
  return build_ffi_library(_SOURCE, "onednn_conv", args, digest_extra=str(root.resolve()))


def build_ffi_library(source: pathlib.Path, name: str, args: list[str],
                      digest_extra: str = "") -> pathlib.Path:
  """``source`` (C++ XLA FFI handlers) compiled against jaxlib's FFI headers, cached.

  One build per source text, jaxlib version, compiler, ``args`` and
  ``digest_extra``, kept in ``$GECO_JAX_CACHE`` as ``{name}-{digest}.so``.
  Raises ``OneDNNUnavailable`` without a compiler or when the build fails.
  """
  import jaxlib  # noqa: PLC0415 (only here: the build depends on jaxlib's version)

  compiler = _compiler()
  include = jax.ffi.include_dir()
  digest = hashlib.sha256()
  for part in (source.read_bytes(), jaxlib.__version__.encode(), str(include).encode(),
               digest_extra.encode(), compiler.encode(), " ".join(args).encode()):
    digest.update(part)
  target = _cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(source), "-o",
               str(built), f"-I{include}", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise OneDNNUnavailable(
          f"building {source.name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    os.replace(built, target)   # atomic: a concurrent build leaves one whole file
  return target


_lock = threading.Lock()
_loaded: list[ctypes.CDLL] = []   # the handlers' library, once loaded and registered


def _library() -> ctypes.CDLL:
  """Build (or find) the handlers, load them and register the FFI targets; once."""
  with _lock:
    if not _loaded:
      path = _build(check_installed())
      try:
        library = ctypes.CDLL(str(path))
      except OSError as e:
        raise OneDNNUnavailable(f"loading {path} failed: {e}") from e
      for symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
      _loaded.append(library)
    return _loaded[0]


def available() -> tuple[bool, str]:
  """(True, oneDNN's version) if ``conv2d_same`` can run here, else (False, why not)."""
  try:
    require()
  except OneDNNUnavailable as e:
    return False, str(e)
  version = _library().GecoOnednnVersion()
  return True, f"oneDNN {version // 10000}.{version // 100 % 100}.{version % 100}"


def usable_for_step(num_devices: int | None = None) -> tuple[bool, str]:
  """Whether a training step over ``num_devices`` should use these convolutions, and why.

  True where JAX's default backend is the CPU, the step runs on one device
  (``num_devices``, default ``jax.device_count()``: XLA does not split the
  custom calls over several) and ``available()`` (oneDNN's packages and a C++
  compiler; the handlers are built here once, in about 5 s, then cached).
  The models' ``choose_convolutions`` (what the experiments' ``'auto'``
  means) ask this.
  """
  backend = jax.default_backend()
  if backend != "cpu":
    return False, (f"JAX's default backend is {backend!r}: oneDNN's convolutions run on "
                   "the CPU only")
  num_devices = jax.device_count() if num_devices is None else num_devices
  if num_devices != 1:
    return False, (f"the step runs on {num_devices} devices, over which XLA does not "
                   "split oneDNN's calls")
  ok, why = available()
  if not ok:
    return False, f"oneDNN's convolutions are unavailable here: {why}"
  return True, f"the CPU backend, one device, {why}"


def require() -> None:
  """Raise ``OneDNNUnavailable`` unless oneDNN convolutions can run (builds them once)."""
  if jax.default_backend() != "cpu":
    raise OneDNNUnavailable(
        f"oneDNN convolutions run on XLA:CPU only; JAX's default backend here is "
        f"{jax.default_backend()!r} (use XLA's convolutions there).")
  _library()


def _ffi(algorithm: str, op: str, shape, a, b, **attributes):
  return jax.ffi.ffi_call(_TARGETS[algorithm, op], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(a, b, **attributes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, algorithm):
  """x * w by ``algorithm``; for 'winograd', ``w`` is ``winograd_kernel``'s U."""
  return _ffi(algorithm, "forward", (*x.shape[:3], w.shape[-1]), x, w)


def _conv_fwd(x, w, algorithm):
  return _conv(x, w, algorithm), (x, w)


def _conv_bwd(algorithm, residuals, dy):
  x, w = residuals
  return (_ffi(algorithm, "backward_data", x.shape, dy, w),
          _ffi(algorithm, "backward_weights", w.shape, x, dy))


_conv.defvjp(_conv_fwd, _conv_bwd)


def _window_attributes(window):
  (stride_h, stride_w), ((top, bottom), (left, right)) = window
  return dict(stride_h=np.int64(stride_h), stride_w=np.int64(stride_w),
              pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right))


def _window_output(x_shape, w_shape, window):
  (sh, sw), ((top, bottom), (left, right)) = window
  return (x_shape[0], (x_shape[1] + top + bottom - w_shape[0]) // sh + 1,
          (x_shape[2] + left + right - w_shape[1]) // sw + 1, w_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _window_conv(x, w, window):
  """x * w with ``window`` = (strides, padding), by oneDNN's direct convolution."""
  return _ffi("window", "forward", _window_output(x.shape, w.shape, window), x, w,
              **_window_attributes(window))


def _window_conv_fwd(x, w, window):
  return _window_conv(x, w, window), (x, w)


def _window_conv_bwd(window, residuals, dy):
  x, w = residuals
  attributes = _window_attributes(window)
  return (_ffi("window", "backward_data", x.shape, dy, w, **attributes),
          _ffi("window", "backward_weights", w.shape, x, dy, **attributes))


_window_conv.defvjp(_window_conv_fwd, _window_conv_bwd)

# Winograd's F(2x2, 3x3): the kernel's transform G (Lavin & Gray, 2016).
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_kernel(w: jax.Array) -> jax.Array:
  """U [16, c, f]: U_(4i + j) = (G g G^T)_ij of an HWIO 3x3 kernel g [3, 3, c, f].

  In JAX, so that a kernel used by several convolutions (ConvDraw's T steps)
  is transformed once (XLA merges the identical transforms: a ConvDraw
  gradient computes 5, one per kernel slice in use) and its gradient,
  G^T dU G, is autodiff's ([9, 16] x [16, c f] per call: XLA does not sum
  the calls' dU first).
  """
  # One [16, 9] x [9, c f] product with G (x) G (Kronecker): K[4i + j, 3k + l] =
  # G[i, k] G[j, l]. (The three-operand einsum compiled 10x slower here: 1.5 ms
  # against 0.15 at 80 -> 128 channels.)
  g = np.asarray(WINOGRAD_G, np.float32)
  k = jnp.asarray(np.kron(g, g), w.dtype)
  c, f = w.shape[2:]
  u = jnp.dot(k, w.reshape(9, c * f), precision=jax.lax.Precision.HIGHEST)
  return u.reshape(16, c, f)


def conv2d(x: jax.Array, w: jax.Array, strides=(1, 1), padding="SAME") -> jax.Array:
  r"""NHWC ``x`` [n, h, w, c] convolved with HWIO ``w`` [kh, kw, c, f] by oneDNN.

  The value and both gradients of

    jax.lax.conv_general_dilated(x, w, strides, padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

  (to float rounding): ``y[n, p, q, o] = sum_{i, j, c} xp[n, s_h p + i,
  s_w q + j, c] w[i, j, c, o]``, with ``xp`` x padded by ``padding`` (zeros),
  computed by oneDNN's direct convolution on XLA's thread pool (see the module
  docstring). ``strides``: two positive ints. ``padding``: ``'SAME'``,
  ``'VALID'`` or ((top, bottom), (left, right)), non-negative, as
  ``lax.conv_general_dilated`` takes it. Its gradients: backward data is the
  transposed convolution of dy with w, the kernel gradient the correlation of
  xp with dy, both oneDNN's primitives.

  Raises ``OneDNNUnavailable`` (see ``available()``) and ``ValueError`` for
  inputs it does not take.
  """
  require()
  _check_operands("conv2d", x, w)
  strides = tuple(int(v) for v in strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f"conv2d's strides must be two positive ints; got {strides}.")
  bad_padding = (f"conv2d's padding must be 'SAME', 'VALID' or ((top, bottom), "
                 f"(left, right)); got {padding!r}.")
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(bad_padding)
    padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  pads = tuple(tuple(int(v) for v in pair) for pair in padding)
  if len(pads) != 2 or any(len(pair) != 2 for pair in pads):
    raise ValueError(bad_padding)
  if min(min(pair) for pair in pads) < 0:
    raise ValueError(f"conv2d's padding must be non-negative; got {pads}.")
  window = (strides, pads)
  out = _window_output(x.shape, w.shape, window)
  if out[1] < 1 or out[2] < 1:
    raise ValueError(f"conv2d: a {w.shape[0]} x {w.shape[1]} kernel does not fit in the "
                     f"{x.shape[1]} x {x.shape[2]} image padded by {pads}.")
  return _window_conv(x, w, window)


def _check_operands(name: str, x, w) -> None:
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
    raise ValueError(
        f"{name} takes x [n, h, w, c] and w [kh, kw, c, f]; got x {x.shape}, "
        f"w {w.shape}.")
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f"{name} takes float32; got x {x.dtype}, w {w.dtype} (XLA's "
                     "convolutions take the others).")


def conv2d_same(x: jax.Array, w: jax.Array, algorithm: str = "direct") -> jax.Array:
  r"""NHWC ``x`` [n, h, w, c] convolved with HWIO ``w`` [kh, kw, c, f], stride 1, SAME.

  Differentiable in both arguments. ``algorithm``:

  - ``'direct'``: oneDNN's direct convolution (any kernel size);
  - ``'winograd'``: Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray,
    2016), 3x3 kernels only. Per 2x2 output tile and channel pair,

      y = A^T [(G g G^T) . (B^T d B)] A

    (d: the tile's 4x4 input window, g: the kernel), so 16 multiplications
    instead of 36; summed over channels, the 16 positions of the product are
    16 matrix products (oneDNN's sgemm). U = G g G^T is computed in JAX
    (``winograd_kernel``). Gradients: backward data is the same convolution with
    the kernel turned by 180 degrees and its channels swapped (the same U, its
    positions permuted); the kernel gradient is
    G^T [sum over tiles of (B^T d B)^T (A dy A^T)] G, the outer transform
    autodiff's.
    The transforms add and subtract, so values differ from the direct sum by
    float rounding (about 1e-6 relative), not more.

  Raises ``OneDNNUnavailable`` (see ``available()``) and ``ValueError`` for
  inputs it does not take.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {algorithm!r}.")
  require()
  _check_operands("conv2d_same", x, w)
  if algorithm == "winograd" and w.shape[:2] != (3, 3):
    raise ValueError(f"algorithm='winograd' takes 3x3 kernels; got {w.shape[0]}x{w.shape[1]} "
                     "('direct' takes any).")
  if algorithm == "winograd":
    return _conv(x, winograd_kernel(w), algorithm)
  return _conv(x, w, algorithm)
