"""The conversion's progress bar: bytes of source tensors done, with the rate and the time left, on
stderr when it is a terminal (nothing in logs, pipes, or with --quiet)."""

from __future__ import annotations

import math
import sys
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mlx_gemma3n.weights.mapped import SAFETENSORS_DTYPES
from mlx_gemma3n.weights.matformer import CutLocation

QUIET_HELP = "no progress bar (shown on stderr when it is a terminal)"


def stored_bytes(location) -> int:
    """Bytes of a tensor as its file holds it (of a MatFormer cut: the part that is read)."""
    dtype = (location.location if isinstance(location, CutLocation) else location).dtype
    return math.prod(location.shape) * np.dtype(SAFETENSORS_DTYPES[dtype][0]).itemsize


def with_progress(locations: dict, quiet: bool) -> Iterator[tuple[str, object]]:
    """The (name, location) pairs; each counts as done when the loop asks for the next one."""
    sizes = {name: stored_bytes(location) for name, location in locations.items()}
    shown = not quiet and sys.stderr.isatty()
    with tqdm(total=sum(sizes.values()), desc="converting", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=not shown, dynamic_ncols=True, leave=True) as bar:
        for name, location in locations.items():
            yield name, location
            bar.update(sizes[name])
