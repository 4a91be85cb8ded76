"""Custom operations behind the models: oneDNN convolutions for XLA:CPU
(``onednn``), a fusion barrier for recurrences' backward passes (``fusion``)
and a stride-1 convolution whose kernel gradient XLA:CPU runs as dots
(``conv``)."""

from geco_jax.ops import conv
from geco_jax.ops import fusion
from geco_jax.ops import onednn

__all__ = ["conv", "fusion", "onednn"]
