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
"""

from . import adapters as adapters
from . import cache as cache
from . import config as config
from . import distributed as distributed
from . import losses as losses
from . import schedules as schedules
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
from .algebra import proj as proj
from .algebra import register_loss as register_loss
from .algebra import relation_kl as relation_kl
from .algebra import reverse_kl as reverse_kl
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
from .config import ConfigError as ConfigError
from .config import SpecConfig as SpecConfig
from .config import TasksConfig as TasksConfig
from .config import from_config as from_config
from .config import from_textbrewer as from_textbrewer
from .config import to_config as to_config
from .losses import probability_shift as probability_shift
from .step import NonFiniteError as NonFiniteError
from .step import Step as Step
from .step import StepOutput as StepOutput
from .step import make_step as make_step

__version__ = "0.1.0.dev0"
