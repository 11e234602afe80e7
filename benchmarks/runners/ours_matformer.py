"""mlx-gemma3n running a MatFormer slice of the folder, cut as it loads: the slice named by
$BENCH_MATFORMER (a name from `python -m mlx_gemma3n.matformer --list`); otherwise as `ours`."""

import os

from mlx_gemma3n import load

from .measure import run
from .ours import stream

if __name__ == "__main__":
    run(lambda path: load(path, matformer=os.environ["BENCH_MATFORMER"]), stream)
