"""One module per runtime. `python -m benchmarks.runners.NAME --model DIR ...` loads the model, runs the
measurement of `measure.py` and prints one `RESULT {json}` line; the harness runs each in its own process.

BENCH_DEVICE=cpu|gpu sets MLX's default device here, before a runner imports its runtime (mlx-lm
binds its generation stream to the default device at import).
"""

import os

if os.environ.get("BENCH_DEVICE"):
    import mlx.core as mx

    mx.set_default_device(getattr(mx, os.environ["BENCH_DEVICE"]))
