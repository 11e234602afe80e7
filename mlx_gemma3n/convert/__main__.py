"""`python -m mlx_gemma3n.convert`: the command line (convert/cli.py)."""

import sys

from .cli import main

sys.exit(main())
