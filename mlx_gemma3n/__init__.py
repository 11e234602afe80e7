"""mlx-gemma3n: a native MLX runtime for Google's Gemma 3n."""

from __future__ import annotations

from pathlib import Path

from .errors import Gemma3nError
from .loader import COMPUTE_DTYPES, load_model, resolve_model_path
from .processor import Processor

__all__ = ["load", "Gemma3nError"]


def load(path_or_hub_id: str | Path, dtype=None):
    """(model, processor) from a local model folder or a Hugging Face hub id.

    dtype: None keeps the checkpoint's dtype; "bfloat16", "float16", "float32" or an mx.Dtype casts.
    """
    if isinstance(dtype, str) and dtype not in COMPUTE_DTYPES:
        raise Gemma3nError(f"unknown dtype '{dtype}' (choose from {', '.join(COMPUTE_DTYPES)})")
    model_dir = resolve_model_path(path_or_hub_id)
    model = load_model(model_dir, dtype=dtype)
    return model, Processor(model_dir)
