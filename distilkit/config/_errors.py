"""``ConfigError``: a spec config that cannot be read, with every problem located by its path in the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pydantic import ValidationError


class ConfigError(ValueError):
    """A spec config that cannot be read or rebuilt (a ``ValueError``).

    The message lists each problem as ``<path>: <message>``, the path joining the keys and list indices that lead to
    the offending value (``terms.2.options.temperature``). ``problems`` holds the same ``(path, message)`` pairs.
    """

    def __init__(self, message: str, problems: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)


# Union tags pydantic writes into error locations (``terms.0.weight.0.schedule.linear.steps``): not part of the path.
TAGS = frozenset({
    "spec", "tasks", "constant", "linear", "cosine", "exponential", "piecewise_constant", "join", "linear_growth",
    "linear_decay", "product", "flsw", "cwsm", "null", "bool", "int", "float", "str", "node", "number", "schedule",
})
_DICT_FIELDS = frozenset({"options", "specs"})  # the element after these is a user's key, never a tag
_PREFIXES = ("Value error, ", "Assertion failed, ")


def path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a dotted path, without union tags."""
    parts: list[str] = []
    previous: str | int | None = None
    for element in loc:
        if isinstance(element, int) or previous in _DICT_FIELDS or element not in TAGS:
            parts.append(str(element))
        previous = element
    return ".".join(parts) or "<root>"


def problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(path, message)`` for each error of a pydantic ``ValidationError``."""
    found = []
    for e in error.errors(include_url=False):
        message = e["msg"]
        for p in _PREFIXES:
            if message.startswith(p):
                message = message[len(p):]
        found.append((join(prefix, path(e["loc"])), message))
    return found


def join(prefix: str, tail: str) -> str:
    if not prefix:
        return tail
    return prefix if tail == "<root>" else f"{prefix}.{tail}"


def merge(loaded: Sequence[tuple[str, str]], found: Sequence[tuple[str, str]], refused: Sequence[str] = (),
          order: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """The loader's problems ``loaded`` and the later ones ``found``, without repeats and without later ones at or
    inside the paths ``refused`` (values the loader refused and reported: the models then reject their placeholders),
    in the order of the document (``order``: each path's place in it; a path not in it, such as a missing field,
    goes with the deepest of its parents that is)."""
    out = dict.fromkeys(loaded)
    covered = set(refused)
    for where, message in found:
        parts = where.split(".")
        if not any(".".join(parts[:n]) in covered for n in range(1, len(parts) + 1)):
            out.setdefault((where, message))
    return sorted(out, key=lambda problem: _place(problem[0], order or {}))


def _place(where: str, order: Mapping[str, int]) -> tuple:
    parts = where.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in order:
            return (order[prefix], len(parts) - n)
    return (-1 if where == "<root>" else len(order), 0)


def config_error(found: Sequence[tuple[str, str]], source: str | None = None, api: str = "from_config",
                 what: str = "spec config", one_line: bool = False) -> ConfigError:
    """One ``ConfigError`` listing ``found``; ``source`` names the file it came from. ``one_line``: a single
    problem reads ``<api>: <path>: <message>``."""
    where = f" in {source}" if source else ""
    if one_line and len(found) == 1:
        (path_, message), = found
        return ConfigError(f"{api}: {path_}: {message.rstrip('.')}{where}.", found)
    count = f"{len(found)} problems" if len(found) != 1 else "1 problem"
    lines = "\n".join(f"  {p}: {m}" for p, m in found)
    return ConfigError(f"{api}: invalid {what}{where} ({count}):\n{lines}", found)
