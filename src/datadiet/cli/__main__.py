"""`python -m datadiet.cli ...` (and `accelerate launch -m datadiet.cli ...`) runs the `datadiet` command."""

import sys

from . import main

sys.exit(main())
