"""distilkit: knowledge distillation for PyTorch with a functional core.

Pure losses (``dk.kd_ce``, ``dk.hidden_mse``, ...) live in :mod:`distilkit.losses` and are re-exported here.
"""

from . import losses as losses
from .losses import *  # noqa: F403  (the loss namespace is part of the top-level one)
from .losses import __all__ as _loss_names

__version__ = "0.1.0.dev0"
__all__ = ["__version__", "losses", *_loss_names]
