"""`python -m mlx_gemma3n.generate`: the command line (generate/cli.py)."""

import sys

from .cli import main

sys.exit(main())
