"""Reading a config given as a mapping, JSON text or the path of a JSON file — one rule for every reader."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._errors import ConfigError


def load_json(config: Any, api: str) -> tuple[Any, str | None]:
    """``(value, source)``: a mapping as it is; a str starting with ``{`` parsed as JSON text; a str or
    ``os.PathLike`` read as a JSON file (``source`` names it). Anything else is returned for the caller to reject.

    A str that is no file but contains ``{`` or a newline is JSON text with something in front, and is parsed (so
    that it fails as malformed JSON, not as an odd file name).
    """
    if isinstance(config, Mapping):
        return config, None
    if isinstance(config, str) and config.lstrip().startswith("{"):
        return parse(config, api, None), None
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            is_file = path.is_file()
        except OSError:  # e.g. a name too long to be a path
            is_file = False
        if not is_file:
            if isinstance(config, str) and ("{" in config or "\n" in config):
                return parse(config, api, None), None
            raise FileNotFoundError(f"{api}: no such file: {str(config)!r} (a str is read as JSON text only when it "
                                    "starts with '{').")
        source = repr(str(config))
        return parse(path.read_text(encoding="utf-8"), api, source), source
    return config, None


def parse(text: str, api: str, source: str | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f" in {source}" if source else ""
        raise ConfigError(f"{api}: malformed JSON{where} at line {error.lineno}, column {error.colno}: {error.msg}.",
                          [("<root>", f"line {error.lineno}, column {error.colno}: {error.msg}")]) from None
