"""Custom kernels behind the models: oneDNN convolutions for XLA:CPU (``onednn``)."""

from geco_jax.ops import onednn

__all__ = ["onednn"]
