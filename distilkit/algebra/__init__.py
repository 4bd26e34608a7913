"""The loss algebra: ``Loss.on(...)`` → ``Term``; ``+``, ``number *``, ``schedule *``, ``.named()``; ``layers``;
projections and ``init_params``; multi-teacher and multi-task building blocks."""

from . import _proj as proj
from ._loss import REGISTRY as REGISTRY
from ._loss import Loss as Loss
from ._loss import attention_ce as attention_ce
from ._loss import attention_kl as attention_kl
from ._loss import attention_mse as attention_mse
from ._loss import cosine as cosine
from ._loss import fsp as fsp
from ._loss import get_loss as get_loss
from ._loss import hard_ce as hard_ce
from ._loss import hidden_mse as hidden_mse
from ._loss import jsd as jsd
from ._loss import kd_ce as kd_ce
from ._loss import kd_kl as kd_kl
from ._loss import kd_mse as kd_mse
from ._loss import mmd as mmd
from ._loss import nst as nst
from ._loss import pkd as pkd
from ._loss import precomputed as precomputed
from ._loss import register_loss as register_loss
from ._loss import relation_kl as relation_kl
from ._loss import reverse_kl as reverse_kl
from ._loss import skew_kl as skew_kl
from ._loss import tvd as tvd
from ._multi import Tasks as Tasks
from ._multi import ensemble as ensemble
from ._multi import task_sampler as task_sampler
from ._multi import tasks as tasks
from ._proj import Projection as Projection
from ._proj import init_params as init_params
from ._term import Spec as Spec
from ._term import SpecKeyError as SpecKeyError
from ._term import Term as Term
from ._term import layers as layers

__all__ = [
    "REGISTRY", "Loss", "Projection", "Spec", "SpecKeyError", "Tasks", "Term", "attention_ce", "attention_kl",
    "attention_mse", "cosine", "ensemble", "fsp", "get_loss", "hard_ce", "hidden_mse", "init_params", "jsd",
    "kd_ce", "kd_kl", "kd_mse", "layers", "mmd", "nst", "pkd", "precomputed", "proj", "register_loss",
    "relation_kl", "reverse_kl", "skew_kl", "task_sampler", "tasks", "tvd",
]
