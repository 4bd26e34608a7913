"""Write a step's metrics to TensorBoard event files; the only place where metrics reach the host.

``out.metrics`` from the step holds 0-d tensors that stay on the device, so the training loop never waits for
them. :class:`Writer` copies them to the host only on the steps it writes (``step % every == 0``), all metrics of
a step in one transfer per device, and writes them as TensorBoard scalars::

    with dk.tensorboard.Writer("runs/kd", every=10) as writer:
        writer.log_config(spec)                      # the spec's JSON config as text + hyperparameters
        for i, batch in enumerate(loader):
            out = step(student(**batch), teacher(**batch), batch, step=i, params=params)
            out.loss.backward(); optimizer.step(); optimizer.zero_grad()
            writer.log(out.metrics, i)               # no host synchronisation unless i % 10 == 0

Under ``torch.distributed`` only global rank 0 writes (the others validate their input and do nothing else);
reduce the metrics across ranks first if rank 0's local values are not what you want to see.
The event files are those of ``torch.utils.tensorboard.SummaryWriter``; view them with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # importing TensorBoard costs ~0.2 s: it happens when the first Writer is made
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["Writer"]

_API = "tensorboard.Writer"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        got = "a tensor" if isinstance(step, Tensor) else _short(step)
        hint = (
            " Pass the Python loop counter: reading a tensor step would synchronise."
            if isinstance(step, Tensor)
            else ""
        )
        raise TypeError(f"{_API}: expected step to be an int, got {got}.{hint}")
    if step < 0:
        raise ValueError(f"{_API}: expected step >= 0, got {step}.")
    return int(step)


def _check_metrics(metrics: object) -> None:
    """Metadata-only checks (names, types, shapes, dtypes): no tensor value is read."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{_API}: expected metrics to be a mapping of name to number or 0-d tensor, got {_short(metrics)}."
        )
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{_API}: expected metric names to be non-empty strings, got {_short(name)}.")
        if isinstance(value, Tensor):
            if value.ndim != 0:
                raise ValueError(
                    f"{_API}: expected metrics[{name!r}] to be a 0-d tensor, got shape {tuple(value.shape)}. "
                    "Reduce it first (e.g. .mean())."
                )
            if value.is_complex():
                raise TypeError(f"{_API}: expected metrics[{name!r}] to be real, got dtype {value.dtype}.")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{_API}: expected metrics[{name!r}] to be a number or a 0-d tensor, got {_short(value)}.")


def _to_host(tensors: list[Tensor]) -> list[float]:
    """Values of 0-d tensors as floats, with one device-to-host copy per device (one in practice)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    values = [0.0] * len(tensors)
    for device, indices in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        host = torch.stack([tensors[i].detach().to(dtype) for i in indices]).cpu().tolist()
        for i, v in zip(indices, host, strict=True):
            values[i] = v
    return values


def _config_text(config: object) -> tuple[str, Any]:
    """The config as JSON text and as the parsed JSON value."""
    from .algebra import Spec, Tasks, Term

    if isinstance(config, (Term, Spec, Tasks)):
        from .config import to_config

        config = to_config(config)
    elif hasattr(config, "to_config") and callable(config.to_config):  # duck-typed: anything giving a model
        config = config.to_config()
        if not hasattr(config, "model_dump_json"):
            raise TypeError(f"{_API}: expected .to_config() to return a pydantic model, got {_short(config)}.")
    if isinstance(config, str):
        try:
            return config, json.loads(config)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{_API}: expected the config string to be JSON text, got {_short(config)} ({error})."
            ) from None
    if hasattr(config, "model_dump_json") and callable(config.model_dump_json):  # a pydantic model
        text = config.model_dump_json(indent=2)
        return text, json.loads(text)
    if isinstance(config, Mapping):
        try:
            text = json.dumps(dict(config), indent=2, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"{_API}: expected a JSON-serialisable config mapping, got one that is not ({error})."
            ) from None
        return text, json.loads(text)
    raise TypeError(
        f"{_API}: expected a config (a spec, a pydantic model, a dict or a JSON string), "
        f"got {_short(config)}."
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"a": {"b": [1, {"c": "x"}]}}`` -> ``{"a.b.0": 1, "a.b.1.c": "x"}``; null and empty containers dropped."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    elif isinstance(tree, (bool, int, float, str)):
        return {prefix or "value": tree}
    else:
        return {}
    flat: dict[str, bool | int | float | str] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _markdown_code(text: str) -> str:
    """``text`` as a fenced JSON block (TensorBoard renders text as Markdown), fence longer than any backtick run."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}json\n{text}\n{fence}"


class Writer:
    """Writes metrics as TensorBoard scalars every ``every`` steps, and a config as text and hyperparameters.

    Args:
        log_dir: directory of the run (created when needed); TensorBoard shows each directory as one run.
        every: write on the steps where ``step % every == 0``; other calls to :meth:`log` only check their input.
        flush_secs: how often the event file is flushed to disk in the background.

    Use it as a context manager, or call :meth:`close` at the end (events still queued are written then).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, every: int = 1, flush_secs: float = 120) -> None:
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise TypeError(f"{_API}: expected log_dir to be a path, got {_short(log_dir)}.")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every <= 0:
            raise ValueError(f"{_API}: expected every to be an int >= 1, got {_short(every)}.")
        if (
            isinstance(flush_secs, bool)
            or not isinstance(flush_secs, numbers.Real)
            or not math.isfinite(flush_secs)
            or flush_secs <= 0
        ):
            raise ValueError(f"{_API}: expected flush_secs to be a number > 0, got {_short(flush_secs)}.")
        self.log_dir = os.fspath(log_dir)
        self.every = int(every)
        self._hparams_written = False
        self._closed = False
        self._writer: SummaryWriter | None = None
        if _is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        """False on the ranks other than 0 under ``torch.distributed``: nothing is written there."""
        return self._writer is not None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{_API}: expected an open writer, got one that is closed ({self.log_dir!r}).")

    def log(self, metrics: Mapping[str, Tensor | float], step: int) -> None:
        """Write each metric as the scalar ``name`` at ``step`` when ``step % every == 0``; otherwise do nothing.

        ``metrics`` maps names to Python numbers or 0-d tensors (any device, any real dtype), e.g. ``out.metrics``.
        On the steps written, all tensors go to the host together (one copy per device); on the others no tensor
        value is read, so there is no synchronisation.
        """
        self._check_open()
        step = _check_step(step)
        _check_metrics(metrics)
        if self._writer is None or step % self.every != 0:
            return
        on_device = [name for name, value in metrics.items() if isinstance(value, Tensor)]
        host = dict(zip(on_device, _to_host([metrics[name] for name in on_device]), strict=True))
        walltime = time.time()
        for name, value in metrics.items():
            self._writer.add_scalar(name, host[name] if name in host else float(value), step, walltime=walltime)

    def log_config(self, config: object, *, tag: str = "config", hparams: bool = True) -> None:
        """Write ``config`` as JSON text under ``tag`` (step 0) and, with ``hparams``, as the run's hyperparameters.

        ``config`` is a spec (written as ``dk.to_config(spec)``; or anything with ``.to_config()`` returning a
        pydantic model), a pydantic model (written
        with ``model_dump_json(indent=2)``), a JSON-serialisable dict (``json.dumps(indent=2)``) or a JSON string
        (written unchanged). The text is a fenced ```` ```json ```` Markdown block, so the TEXT tab shows it
        formatted. The hyperparameters are the JSON's scalar leaves keyed by their path (``"terms.0.weight"``,
        list items by index; null dropped) and appear in the HPARAMS tab next to the run's scalars. TensorBoard
        keeps one set of hyperparameters per run: a second call with ``hparams=True`` raises; pass
        ``hparams=False`` to log more configs as text only, or log one dict holding them all.
        """
        self._check_open()
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"{_API}: expected tag to be a non-empty string, got {_short(tag)}.")
        if not isinstance(hparams, bool):
            raise TypeError(f"{_API}: expected hparams to be a bool, got {_short(hparams)}.")
        if hparams and self._hparams_written:
            raise ValueError(
                f"{_API}: expected hparams=False, got hparams=True after this run's hyperparameters were written "
                "(TensorBoard keeps only the first set per run). Log one dict holding every config instead."
            )
        text, tree = _config_text(config)
        flat = _flatten(tree) if hparams else {}
        self._hparams_written |= bool(flat)
        if self._writer is None:
            return
        self._writer.add_text(tag, _markdown_code(text), global_step=0)
        if flat:
            from tensorboard.plugins.hparams import summary_v2

            self._writer.file_writer.add_summary(summary_v2.hparams_pb(flat), global_step=0)

    def flush(self) -> None:
        """Write the queued events to disk now."""
        if self._writer is not None and not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls to :meth:`log` raise. Closing twice does nothing."""
        if self._writer is not None and not self._closed:
            self._writer.close()
        self._closed = True

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self.enabled else "disabled on this rank")
        return f"tensorboard.Writer({self.log_dir!r}, every={self.every}, {state})"
