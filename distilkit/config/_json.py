"""The one loader of spec and TextBrewer files: a mapping, JSON text, or the path of a JSON file, checked the same way.

:func:`load` returns a :class:`Loaded`: the value as plain dicts and lists, the source it came from, and every problem
found with its path (``terms.1.options.temperature``). The same checks run on text and on mappings given from Python:

* nesting at most :data:`~distilkit.config._options.MAX_DEPTH` arrays/objects deep (checked before the text is
  parsed, so that no depth reaches a recursion limit; a cycle in a Python mapping is infinitely deep);
* no key twice in one object (JSON readers disagree on which one counts; Python's keeps the last silently);
* numbers within the limits of :mod:`~distilkit.config._options`: floats finite and within float32's range, integers
  within ±2**53; ``NaN`` and ``Infinity`` (which Python's JSON reader accepts) are not JSON.

A number out of range is replaced by a placeholder that no model accepts, so that the caller can go on validating the
rest and report every problem at once; ``fatal`` problems (malformed or too deeply nested JSON) leave no value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._options import FLOAT_MAX, INT_MAX, MAX_DEPTH

Problems = list[tuple[str, str]]
_INT_DIGITS = len(str(INT_MAX))


class Rejected:
    """A number the loader refused, in place of the value: ``message`` says why, its ``repr`` is the number as
    written."""

    __slots__ = ("message", "text")

    def __init__(self, text: str, message: str) -> None:
        self.text, self.message = text, message

    def __repr__(self) -> str:
        return self.text


@dataclass
class Loaded:
    value: Any
    source: str | None = None
    problems: Problems = field(default_factory=list)
    fatal: bool = False
    refused: list[str] = field(default_factory=list)  # paths of the numbers replaced by a Rejected placeholder
    order: dict[str, int] = field(default_factory=dict)  # each path's place in the document (to sort problems by)
    text: bool = False  # whether the value was parsed from JSON text (else given as a mapping)


def join(parts: tuple) -> str:
    return ".".join(map(str, parts)) or "<root>"


def _short(text: str) -> str:
    """A number as written, its middle left out when long."""
    if len(text) <= 24:
        return text
    digits = text.lstrip("-")
    return f"{text[:10]}...{text[-4:]} ({len(digits)} {'digits' if digits.isdigit() else 'characters'})"


def int_problem(value: int | str) -> str | None:
    text = value if isinstance(value, str) else None
    if text is not None and len(text.lstrip("-")) > _INT_DIGITS:
        return f"expected an integer within ±2**53 (±{INT_MAX}), got {_short(text)}"
    number = int(value)
    if abs(number) > INT_MAX:
        return f"expected an integer within ±2**53 (±{INT_MAX}), got {_short(str(number))}"
    return None


def float_problem(value: float, text: str | None = None) -> str | None:
    if math.isfinite(value) and abs(value) <= FLOAT_MAX:
        return None
    if text is None and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    shown = text if text is not None else repr(value)
    return f"expected a finite number within float32's range (|x| <= {FLOAT_MAX:.4g}), got {_short(shown)}"


# ------------------------------------------------------------------------------------------------ JSON text
class _Object(dict):
    """A parsed JSON object that had keys twice: ``duplicates`` maps each to how often it appeared."""

    duplicates: dict[str, int]


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    counts: dict[str, int] = {}
    for key, _ in pairs:
        counts[key] = counts.get(key, 0) + 1
    obj = _Object(out)
    obj.duplicates = {k: n for k, n in counts.items() if n > 1}
    return obj


def _parse_int(text: str) -> Any:
    message = int_problem(text)
    return Rejected(_short(text), message) if message else int(text)


def _parse_float(text: str) -> Any:
    message = float_problem(float(text), text)
    return Rejected(_short(text), message) if message else float(text)


def _parse_constant(text: str) -> Any:  # NaN, Infinity, -Infinity: Python's reader takes them; JSON has none
    return Rejected(text, f"expected a finite number (JSON has no {text}), got {text}")


# A quoted string, or an unterminated one up to the end (so that no text makes the scan quadratic).
_STRING = r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)'
_TOKENS = re.compile(_STRING + r"|[\[\]{}:,]", re.DOTALL)
_STRINGS = re.compile(_STRING, re.DOTALL)


def _depth(text: str) -> int:
    """The deepest nesting of arrays/objects in ``text`` (quoted strings skipped), without parsing it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    for char in re.sub(r"[^\[\]{}]", "", _STRINGS.sub("", text)):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"line {line}, column {offset - (text.rfind(chr(10), 0, offset) + 1) + 1}"


def _too_deep_in_text(text: str) -> Problems:
    """Each place where the nesting first goes past :data:`MAX_DEPTH`, with its path (a scan of the tokens)."""
    found: Problems = []
    stack: list[list[Any]] = []  # per open container: [kind, key or index, expecting a key]
    pending: str | None = None  # the last string read where a key goes
    skip_to: int | None = None  # inside a container that is too deep: skip until back at this depth
    for match in _TOKENS.finditer(text):
        token = match.group()
        if skip_to is not None:
            if token in "[{":
                stack.append(["skip", None, False])
            elif token in "]}":
                stack.pop()
                if len(stack) == skip_to:
                    skip_to = None
            continue
        top = stack[-1] if stack else None
        if token in "[{":
            if len(stack) == MAX_DEPTH:
                path = tuple(frame[1] for frame in stack if frame[1] is not None)
                found.append((join(path), f"expected at most {MAX_DEPTH} nested arrays and objects, got more "
                                          f"(from {_position(text, match.start())})"))
                skip_to = len(stack)
                stack.append(["skip", None, False])
                continue
            stack.append(["object", None, True] if token == "{" else ["array", 0, False])
        elif token in "]}":
            if stack:
                stack.pop()
        elif token == ":" and top is not None and top[0] == "object":
            top[1], top[2] = pending, False
        elif token == "," and top is not None:
            if top[0] == "array":
                top[1] += 1
            else:
                top[2] = True
        elif token.startswith('"') and top is not None and top[0] == "object" and top[2]:
            try:
                pending = json.loads(token)
            except ValueError:
                pending = token
    return found


def parse(text: str, api: str, source: str | None) -> Loaded:
    """Parse JSON ``text`` and check it (see the module); malformed or too deep: a fatal problem, no value."""
    if _depth(text) > MAX_DEPTH:
        return Loaded(None, source, _too_deep_in_text(text) or [("<root>", f"expected at most {MAX_DEPTH} nested "
                                                                           "arrays and objects, got more")],
                      fatal=True, text=True)
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_parse_constant)
    except json.JSONDecodeError as error:
        where = f" in {source}" if source else ""
        raise ConfigError(f"{api}: malformed JSON{where} at line {error.lineno}, column {error.colno}: {error.msg}.",
                          [("<root>", f"malformed JSON at line {error.lineno}, column {error.colno}: "
                                      f"{error.msg}")]) from None
    except RecursionError:  # not expected: the depth was checked
        return Loaded(None, source, [("<root>", f"expected at most {MAX_DEPTH} nested arrays and objects, got "
                                                "more")], fatal=True, text=True)
    loaded = check(value, source)
    loaded.text = True
    return loaded


# ------------------------------------------------------------------------------------------------ values
def check(value: Any, source: str | None = None) -> Loaded:
    """``value`` (parsed JSON, or a mapping from Python) as plain dicts and lists, with every problem (see the
    module). Pydantic models inside are dumped first, so that their numbers are checked too. Iterative: no depth of
    input reaches a recursion limit."""
    from pydantic import BaseModel

    found: Problems = []
    refused: list[str] = []
    order: dict[str, int] = {}
    fatal = False

    def convert(item: Any, path: tuple) -> tuple[Any, list | None]:
        """The checked copy of ``item``, and its children still to visit as ``(value, path, container, key)``, last
        first."""
        order.setdefault(join(path), len(order))
        if isinstance(item, BaseModel):
            item = item.model_dump()
        if isinstance(item, Rejected):
            found.append((join(path), item.message))
            refused.append(join(path))
            return item, None
        if isinstance(item, bool) or item is None or isinstance(item, str):
            return item, None
        if isinstance(item, int):
            message = int_problem(item)
            if message:
                found.append((join(path), message))
                refused.append(join(path))
                return Rejected(_short(str(item)), message), None
            return item, None
        if isinstance(item, float):
            message = float_problem(item)
            if message:
                found.append((join(path), message))
                refused.append(join(path))
                return Rejected(repr(item), message), None
            return item, None
        if isinstance(item, Mapping):
            for key, count in getattr(item, "duplicates", {}).items():
                found.append((join((*path, key)), f"expected each key once in an object, got {key!r} {count} times "
                                                  "(JSON readers disagree on which one counts)"))
            out: dict = {}
            return out, [(v, (*path, k), out, k) for k, v in reversed(list(item.items()))]
        if isinstance(item, (list, tuple)):
            seq: list = [None] * len(item)
            return seq, [(item[i], (*path, i), seq, i) for i in reversed(range(len(item)))]
        return item, None  # anything else: the models reject it with their own message

    root, children = convert(value, ())
    stack = [(children, 1)] if children else []
    while stack:
        pending, depth = stack.pop()
        while pending:
            item, path, container, key = pending.pop()
            if depth >= MAX_DEPTH and isinstance(item, (Mapping, list, tuple, BaseModel)):
                found.append((join(path), f"expected at most {MAX_DEPTH} nested arrays and objects, got more"))
                fatal = True
                continue
            copy, grandchildren = convert(item, path)
            container[key] = copy
            if grandchildren:
                stack.append((pending, depth))
                pending, depth = grandchildren, depth + 1
    return Loaded(None if fatal else root, source, found, fatal, refused, order)


# ------------------------------------------------------------------------------------------------ any input
def load(config: Any, api: str) -> Loaded:
    """``config`` checked (see the module): a mapping (or pydantic model) as it is; a str starting with ``{`` parsed
    as JSON text; a str or ``os.PathLike`` read as a JSON file (``source`` names it). Anything else comes back as it
    is, for the caller to reject.

    A str that is no file but contains ``{`` or a newline is JSON text with something in front, and is parsed (so
    that it fails as malformed JSON, not as an odd file name).
    """
    from pydantic import BaseModel

    if isinstance(config, (Mapping, BaseModel)):
        return check(config)
    if isinstance(config, str) and config.lstrip().startswith("{"):
        return parse(config, api, None)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # e.g. a name too long to be a path, or with a NUL byte
            is_file = False
        if not is_file:
            if isinstance(config, str) and ("{" in config or "\n" in config):
                return parse(config, api, None)
            raise FileNotFoundError(f"{api}: no such file: {str(config)!r} (a str is read as JSON text only when it "
                                    "starts with '{').")
        source = repr(str(config))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{api}: cannot read {source}: not UTF-8 text ({error.reason} at byte {error.start}).",
                              [("<root>", f"not UTF-8 text ({error.reason} at byte {error.start})")]) from None
        return parse(text, api, source)
    return Loaded(config)
