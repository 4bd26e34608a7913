"""Pure loss functions ``(student, teacher, *, options) -> Tensor``.

Every loss is a (sum, count) pair over kept positions: ``reduction="mean"`` (default) is ``sum / max(count, 1)``,
``"sum"`` the sum, ``"none"`` the unreduced values with masked entries 0 (``none.sum() == sum``). Each function's
``.sum_count(...)`` returns the pair itself, for normalising over several micro-batches or ranks. Inputs are
upcast to float32 inside; teacher tensors never get gradients; a fully masked input gives 0, never NaN.

The logit divergences (``kd_ce``, ``kd_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``tvd``) take ``impl="auto" |
"dense" | "chunked"``, and a top-k teacher as :class:`TopK`; ``chunked_*`` and ``sparse_*`` are deprecated aliases.
"""

from ._attention import attention_ce as attention_ce
from ._attention import attention_kl as attention_kl
from ._attention import attention_mse as attention_mse
from ._attention import relation_kl as relation_kl
from ._divergences import chunked_jsd as chunked_jsd
from ._divergences import chunked_kd_ce as chunked_kd_ce
from ._divergences import chunked_kd_kl as chunked_kd_kl
from ._divergences import chunked_reverse_kl as chunked_reverse_kl
from ._divergences import chunked_skew_kl as chunked_skew_kl
from ._divergences import chunked_tvd as chunked_tvd
from ._divergences import jsd as jsd
from ._divergences import kd_ce as kd_ce
from ._divergences import kd_kl as kd_kl
from ._divergences import reverse_kl as reverse_kl
from ._divergences import skew_kl as skew_kl
from ._divergences import sparse_jsd as sparse_jsd
from ._divergences import sparse_kd_ce as sparse_kd_ce
from ._divergences import sparse_kd_kl as sparse_kd_kl
from ._divergences import sparse_reverse_kl as sparse_reverse_kl
from ._divergences import sparse_skew_kl as sparse_skew_kl
from ._divergences import sparse_tvd as sparse_tvd
from ._divergences import tvd as tvd
from ._features import cosine as cosine
from ._features import hidden_mse as hidden_mse
from ._features import pkd as pkd
from ._fused import fused_linear_kd as fused_linear_kd
from ._gram import fsp as fsp
from ._gram import mmd as mmd
from ._gram import nst as nst
from ._logits import hard_ce as hard_ce
from ._logits import kd_mse as kd_mse
from ._logits import prob_mse as prob_mse
from ._logits import probability_shift as probability_shift
from ._logits import pseudo_label_ce as pseudo_label_ce
from ._precomputed import precomputed as precomputed
from ._reduce import Reduction as Reduction
from ._sampled import sampled_kl as sampled_kl
from ._sparse import TopK as TopK
from ._uld import uld as uld

__all__ = [
    "Reduction",
    "TopK",
    "attention_ce",
    "attention_kl",
    "attention_mse",
    "chunked_jsd",
    "chunked_kd_ce",
    "chunked_kd_kl",
    "chunked_reverse_kl",
    "chunked_skew_kl",
    "chunked_tvd",
    "cosine",
    "fsp",
    "fused_linear_kd",
    "hard_ce",
    "hidden_mse",
    "jsd",
    "kd_ce",
    "kd_kl",
    "kd_mse",
    "mmd",
    "nst",
    "pkd",
    "precomputed",
    "prob_mse",
    "probability_shift",
    "pseudo_label_ce",
    "relation_kl",
    "reverse_kl",
    "sampled_kl",
    "skew_kl",
    "sparse_jsd",
    "sparse_kd_ce",
    "sparse_kd_kl",
    "sparse_reverse_kl",
    "sparse_skew_kl",
    "sparse_tvd",
    "tvd",
    "uld",
]
