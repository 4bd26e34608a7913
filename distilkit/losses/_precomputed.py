"""A loss the model has already computed (TextBrewer's adaptor ``losses``), reduced like every other loss."""

from __future__ import annotations

from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss


@masked_loss
def precomputed(values: Tensor) -> Parts:
    """The mean of ``values``, a loss the student computed itself (e.g. a Hugging Face ``outputs.loss``).

    Lets such a loss join a spec with a (scheduled) weight, as TextBrewer's ``hard_label_weight`` does with the
    adaptor's ``losses``; a multi-GPU ``DataParallel`` loss of one value per device is averaged.
    """
    return Parts(check.floating("precomputed", "values", values), None)
