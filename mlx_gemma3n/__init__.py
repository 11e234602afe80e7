"""mlx-gemma3n: a native MLX runtime for Google's Gemma 3n.

`from mlx_gemma3n import load, generate, stream_generate`, as with mlx-lm. The command line is
`python -m mlx_gemma3n.generate`; `from mlx_gemma3n.generate import Session` reaches the rest of the
generation module.
"""

from __future__ import annotations

from pathlib import Path

from .adapters import ModelWithAdapters
from .architecture.model import Model
from .command import package_version
from .errors import Gemma3nError
from .generate import GenerationResponse, generate, stream_generate
from .inputs.processor import Processor
from .weights.files import resolve_model_path
from .weights.loader import COMPUTE_DTYPES, load_model

__version__ = package_version()
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "Gemma3nError", "Model", "Processor"]


def load(path_or_hub_id: str | Path, dtype=None, adapter_path: str | Path | None = None, matformer=None):
    """(model, processor) from a local model folder or a Hugging Face hub id.

    dtype: None keeps the checkpoint's dtype; "bfloat16", "float16", "float32" or an mx.Dtype casts.
    adapter_path: a PEFT LoRA adapter (folder or hub id) to run over the model, unfused (its name:
    "default"; see `model.load_adapter` / `model.set_adapter`).
    matformer: run a MatFormer slice of an E4B folder, cut as it loads: a name from
    `python -m mlx_gemma3n.matformer --list` or a JSON file {"ffn_hidden_dims": [...], "layers_to_skip": [...]}.
    """
    if isinstance(dtype, str) and dtype not in COMPUTE_DTYPES:
        raise Gemma3nError(f"unknown dtype '{dtype}' (choose from {', '.join(COMPUTE_DTYPES)})")
    model_dir = resolve_model_path(path_or_hub_id)
    model = load_model(model_dir, dtype=dtype, matformer=matformer, model_class=ModelWithAdapters)
    if adapter_path is not None:
        model.load_adapter(adapter_path)
    return model, Processor(model_dir)

