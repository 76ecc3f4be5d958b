"""`python -m pylazy ...`: the same as the `pylazy` command."""
from .cli import main

raise SystemExit(main())
