"""`python -m mlx_gemma3n.server`: the command line (server/cli.py)."""

import sys

from .cli import main

sys.exit(main())
