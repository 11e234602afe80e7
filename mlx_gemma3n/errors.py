"""The one exception type for problems a user can fix (bad files, bad arguments, bad prompts), and how
the command-line tools report it."""

import os
import sys
from typing import Callable


class Gemma3nError(ValueError):
    """Raised with a message that names the problem; the CLI prints it as one line."""


class ParameterError(Gemma3nError):
    """A bad argument, by the name the API gives it (`param`: e.g. "tools[2].function.name"): the
    server answers it with a 400 naming that parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def run_command(body: Callable[[], None]) -> int:
    """Exit code of a CLI body: a Gemma3nError becomes one `error:` line (1), Ctrl-C 130, a closed
    stdout pipe 1 without a traceback."""
    try:
        body()
        return 0
    except Gemma3nError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # whoever read stdout stopped (`... | head`): end quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
