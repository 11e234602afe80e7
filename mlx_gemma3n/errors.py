"""The one exception type for problems a user can fix (bad files, bad arguments, bad prompts), and how
the command-line tools report it."""

import sys
from typing import Callable


class Gemma3nError(ValueError):
    """Raised with a message that names the problem; the CLI prints it as one line."""


def run_command(body: Callable[[], None]) -> int:
    """Exit code of a CLI body: a Gemma3nError becomes one `error:` line (1), Ctrl-C 130."""
    try:
        body()
        return 0
    except Gemma3nError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
