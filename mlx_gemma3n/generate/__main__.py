"""`python -m mlx_gemma3n.generate`: the command line (mlx_gemma3n/cli.py)."""

import sys

from .cli import main

sys.exit(main())
