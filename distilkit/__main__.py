"""``python -m distilkit`` is the ``distilkit`` command."""

from .cli import main

raise SystemExit(main())
