"""``python -m distilkit`` is the ``distilkit`` command."""

from .cli import main

if __name__ == "__main__":  # importing this module (API docs, tools) runs nothing
    raise SystemExit(main())
