"""Custom operations behind the models: oneDNN convolutions for XLA:CPU
(``onednn``) and a fusion barrier for recurrences' backward passes (``fusion``)."""

from geco_jax.ops import fusion
from geco_jax.ops import onednn

__all__ = ["fusion", "onednn"]
