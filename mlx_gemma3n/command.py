"""What every command-line tool shares: a parser named as the tool was run, with `--version`."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "mlx-gemma3n"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "unknown (not installed)"


def command_parser(module: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`, also installed as the console script `<module>`: usage
    lines name whichever of the two ran."""
    script = os.path.basename(sys.argv[0])
    prog = script if script == module else f"python -m {module}"
    parser = argparse.ArgumentParser(prog=prog, **kwargs)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {package_version()}")
    return parser
