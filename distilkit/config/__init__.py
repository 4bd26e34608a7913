"""Spec files: pydantic models mirroring the loss algebra, JSON round trip and JSON Schema.

``to_config(spec)`` (``dk.to_config``) gives a :class:`SpecConfig` (``dk.tasks``: :class:`TasksConfig`);
``from_config(model | dict | json_text | path)`` rebuilds an equal spec; :func:`schema` is the JSON Schema of a
spec file. Problems are reported as one :class:`ConfigError` listing ``<path>: <message>`` per problem.
"""

from ._convert import from_config as from_config
from ._convert import to_config as to_config
from ._errors import ConfigError as ConfigError
from ._models import SpecConfig as SpecConfig
from ._models import TasksConfig as TasksConfig
from ._models import TermConfig as TermConfig
from ._models import schema as schema
from ._textbrewer import from_textbrewer as from_textbrewer

__all__ = ["ConfigError", "SpecConfig", "TasksConfig", "TermConfig", "from_config",
    "from_textbrewer", "schema", "to_config"]
