"""`python -m datadiet ...` runs the `datadiet` command."""

import sys

from .cli import main

sys.exit(main())
