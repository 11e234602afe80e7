"""`python -m mlx_gemma3n.transcribe`: the command line (transcribe/cli.py)."""

import sys

from .cli import main

sys.exit(main())
