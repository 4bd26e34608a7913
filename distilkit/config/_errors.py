"""``ConfigError``: a spec config that cannot be read, with every problem located by its path in the config."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def config_error(found: Sequence[tuple[str, str]], source: str | None = None) -> ConfigError:
    """One ``ConfigError`` listing ``found``; ``source`` names the file it came from."""
    where = f" in {source}" if source else ""
    count = f"{len(found)} problems" if len(found) != 1 else "1 problem"
    lines = "\n".join(f"  {p}: {m}" for p, m in found)
    return ConfigError(f"from_config: invalid spec config{where} ({count}):\n{lines}", found)
