"""Finding the modules an adapter touches: by our dotted path, seen through the adapter wrappers, with
their float shapes (a quantized module's too) and their names in Hugging Face's model."""

from __future__ import annotations

import mlx.nn as nn

from .layers import LoRALinear, TunedEmbedding

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
WRAPPERS = (LoRALinear, TunedEmbedding)
# Our top-level names and theirs in Transformers' Gemma3nForConditionalGeneration.
MULTIMODAL_TEXT_PREFIX = "model.language_model."
TEXT_ONLY_TEXT_PREFIX = "model."


def child(module, part: str):
    if isinstance(module, list):
        return module[int(part)] if part.isdigit() and int(part) < len(module) else None
    return module.get(part) if isinstance(module, nn.Module) else None


def module_at(model: nn.Module, path: str):
    """The module at our dotted `path` (list items by index), unwrapped; None when there is none."""
    module = model
    for part in path.split("."):
        module = child(module, part)
        if module is None:
            return None
    return module.base if isinstance(module, WRAPPERS) else module


def wrapped_at(model: nn.Module, path: str, wrapper: type) -> nn.Module:
    """The `wrapper` around the module at `path`, putting one in place the first time."""
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else []:
        parent = child(parent, part)
    current = parent[int(name)] if isinstance(parent, list) else parent[name]
    if isinstance(current, wrapper):
        return current
    wrapped = wrapper(current)
    if isinstance(parent, list):
        parent[int(name)] = wrapped
    else:
        setattr(parent, name, wrapped)
    return wrapped


def float_shape(module: nn.Module) -> tuple[int, ...]:
    """The (rows, columns) of a Linear's or Embedding's weight before any quantization."""
    rows, columns = module.weight.shape
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        columns = columns * 32 // module.bits
    return rows, columns


def linear_paths(model: nn.Module) -> list[str]:
    """Our paths of every Linear of the model (a LoRA-wrapped one by its own path)."""
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear) or (isinstance(module, LINEAR_TYPES) and not path.endswith(".base")):
            paths.append(path)
    return paths


def hf_module_name(path: str, text_prefix: str) -> str:
    """Transformers' module name for our `path`; `text_prefix` is where the text model sits in the
    adapter's base (multimodal `model.language_model.` or text-only `model.`)."""
    head, _, rest = path.partition(".")
    return text_prefix + rest if head == "language_model" else f"model.{path}"
