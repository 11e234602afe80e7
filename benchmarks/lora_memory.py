"""Where a QLoRA step's memory goes: MLX peak after the load, after the loss's forward alone, and
after forward + backward, in one process (the `mlx_gemma3n.tuner` pieces `lora` uses: a fresh rank-8
adapter on q/k/v/o and the MLP, per-layer gradient checkpointing, the chunked loss).

    python -m benchmarks.lora_memory FOLDER TOKENS

FOLDER: a quantized model folder (e.g. benchmarks/cache/ours-e2b-int4, made by lora_train.py);
TOKENS: one random sequence of that many tokens, every position labelled. Each peak is measured
after a reset, so it is the phase's own.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma3n import load
from mlx_gemma3n.tuner.adapter import new_adapter
from mlx_gemma3n.tuner.layer_checkpoints import checkpoint_layers
from mlx_gemma3n.tuner.losses import batch_loss


def peak(label: str, started: float) -> None:
    print(f"{label}: MLX peak {mx.get_peak_memory() / 1e9:.3f} GB, active {mx.get_active_memory() / 1e9:.3f} GB, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    mx.reset_peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("tokens", type=int)
    args = parser.parse_args()
    started = time.perf_counter()
    model, _ = load(args.folder)
    peak("load", started)
    new_adapter(model)
    checkpoint_layers(model)
    model.train()
    ids = np.random.default_rng(0).integers(3, 200_000, (1, args.tokens))
    started = time.perf_counter()
    mx.eval(batch_loss(model, ids, ids)[0])
    peak(f"forward ({args.tokens} tokens)", started)
    started = time.perf_counter()
    mx.eval(nn.value_and_grad(model, lambda i, l: batch_loss(model, i, l)[0])(ids, ids))
    peak("forward + backward", started)


if __name__ == "__main__":
    main()
