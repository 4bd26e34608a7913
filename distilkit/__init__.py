"""distilkit: knowledge distillation for PyTorch with a functional core.

* Losses — ``dk.kd_ce``, ``dk.hidden_mse``, ... — call them directly, or ``.on(...)`` them into terms. The bare
  pure functions are in :mod:`distilkit.losses`.
* Algebra — ``term + term``, ``0.5 * term``, ``schedule * term``, ``.named()``, ``dk.layers``, ``dk.proj``,
  ``dk.init_params``; ``dk.ensemble``, ``dk.tasks``, ``dk.task_sampler``.
* Schedules and temperatures — :mod:`distilkit.schedules`, :mod:`distilkit.temperature`.
* Pure core and step — ``dk.loss_fn(spec)`` (a pure ``(loss, metrics)`` function), ``dk.make_step(spec)``
  (validated and compiled); global normalisation in :mod:`distilkit.distributed`; logging in
  :mod:`distilkit.tensorboard`.
* Integrations — ``dk.adapters.hf(model_output)`` maps Hugging Face outputs to ``{"logits", "hidden",
  "attention"}``; ``dk.cache`` stores teacher outputs (dense or top-k) in memory-mapped shards.

``import distilkit`` is cheap: it imports neither torch nor pydantic. Each name is imported on first access (PEP 562),
so ``dk.kd_kl`` loads torch and the losses, ``dk.from_config`` loads pydantic, ``dk.tensorboard`` loads TensorBoard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: the submodules that ``distilkit.<name>`` exposes, imported on first access.
_MODULES = ("adapters", "algebra", "backends", "cache", "config", "distributed", "integrations", "losses",
            "schedules", "step", "temperature", "tensorboard")
#: the names re-exported from each submodule, imported (with their submodule) on first access.
_NAMES = {
    "algebra": ("Loss", "Spec", "SpecKeyError", "Tasks", "Term", "attention_ce", "attention_kl", "attention_mse",
                "chunked_jsd", "chunked_kd_ce", "chunked_kd_kl", "chunked_reverse_kl", "chunked_skew_kl", "chunked_tvd",
                "cosine", "ensemble", "fsp", "fused_linear_kd", "hard_ce", "hidden_mse", "init_params", "jsd",
                "kd_ce", "kd_kl", "kd_mse", "layers", "loss_fn", "mmd", "nst", "pkd", "precomputed", "prob_mse",
                "proj", "pseudo_label_ce", "register_loss", "relation_kl", "reverse_kl", "sampled_kl", "skew_kl",
                "sparse_jsd",
                "sparse_kd_ce", "sparse_kd_kl", "sparse_reverse_kl", "sparse_skew_kl", "sparse_tvd", "task_sampler",
                "tasks", "tvd", "uld"),
    "config": ("ConfigError", "SpecConfig", "TasksConfig", "from_config", "from_textbrewer", "to_config"),
    "losses": ("TopK", "probability_shift"),
    "step": ("NonFiniteError", "Step", "StepOutput", "make_step"),
}
_LAZY: dict[str, tuple[str, str | None]] = {
    **{module: (module, None) for module in _MODULES},
    **{name: (module, name) for module, names in _NAMES.items() for name in names},
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # what static tools (type checkers, IDEs, the API docs) see; at run time __getattr__ imports these
    from . import adapters as adapters
    from . import algebra as algebra
    from . import backends as backends
    from . import cache as cache
    from . import config as config
    from . import distributed as distributed
    from . import integrations as integrations
    from . import losses as losses
    from . import schedules as schedules
    from . import step as step
    from . import temperature as temperature
    from . import tensorboard as tensorboard
    from .algebra import Loss as Loss
    from .algebra import Spec as Spec
    from .algebra import SpecKeyError as SpecKeyError
    from .algebra import Tasks as Tasks
    from .algebra import Term as Term
    from .algebra import attention_ce as attention_ce
    from .algebra import attention_kl as attention_kl
    from .algebra import attention_mse as attention_mse
    from .algebra import chunked_jsd as chunked_jsd
    from .algebra import chunked_kd_ce as chunked_kd_ce
    from .algebra import chunked_kd_kl as chunked_kd_kl
    from .algebra import chunked_reverse_kl as chunked_reverse_kl
    from .algebra import chunked_skew_kl as chunked_skew_kl
    from .algebra import chunked_tvd as chunked_tvd
    from .algebra import cosine as cosine
    from .algebra import ensemble as ensemble
    from .algebra import fsp as fsp
    from .algebra import fused_linear_kd as fused_linear_kd
    from .algebra import hard_ce as hard_ce
    from .algebra import hidden_mse as hidden_mse
    from .algebra import init_params as init_params
    from .algebra import jsd as jsd
    from .algebra import kd_ce as kd_ce
    from .algebra import kd_kl as kd_kl
    from .algebra import kd_mse as kd_mse
    from .algebra import layers as layers
    from .algebra import loss_fn as loss_fn
    from .algebra import mmd as mmd
    from .algebra import nst as nst
    from .algebra import pkd as pkd
    from .algebra import precomputed as precomputed
    from .algebra import prob_mse as prob_mse
    from .algebra import proj as proj
    from .algebra import pseudo_label_ce as pseudo_label_ce
    from .algebra import register_loss as register_loss
    from .algebra import relation_kl as relation_kl
    from .algebra import reverse_kl as reverse_kl
    from .algebra import sampled_kl as sampled_kl
    from .algebra import skew_kl as skew_kl
    from .algebra import sparse_jsd as sparse_jsd
    from .algebra import sparse_kd_ce as sparse_kd_ce
    from .algebra import sparse_kd_kl as sparse_kd_kl
    from .algebra import sparse_reverse_kl as sparse_reverse_kl
    from .algebra import sparse_skew_kl as sparse_skew_kl
    from .algebra import sparse_tvd as sparse_tvd
    from .algebra import task_sampler as task_sampler
    from .algebra import tasks as tasks
    from .algebra import tvd as tvd
    from .algebra import uld as uld
    from .config import ConfigError as ConfigError
    from .config import SpecConfig as SpecConfig
    from .config import TasksConfig as TasksConfig
    from .config import from_config as from_config
    from .config import from_textbrewer as from_textbrewer
    from .config import to_config as to_config
    from .losses import TopK as TopK
    from .losses import probability_shift as probability_shift
    from .step import NonFiniteError as NonFiniteError
    from .step import Step as Step
    from .step import StepOutput as StepOutput
    from .step import make_step as make_step


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'distilkit' has no attribute {name!r}") from None
    value = importlib.import_module(f"{__name__}.{module}")
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({name for name in globals() if name.startswith("__")} | set(_LAZY))
