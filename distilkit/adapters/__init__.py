"""Adapters from model libraries' outputs to distilkit's output mapping ``{"logits", "hidden", "attention"}``."""

from ._causal import causal as causal
from ._hf import hf as hf

__all__ = ["causal", "hf"]
