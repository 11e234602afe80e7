"""Trainable LoRA layers put into a model: fresh ones from LoRA settings (initialised as PEFT does:
A Kaiming-uniform, B zero) or an adapter read from a folder, held in float32 whatever the model's
dtype; everything else frozen.

By default only the text decoder's Linears are candidates (the towers stay frozen); `towers=True`
opens the vision and audio towers' (and their embedders') Linears too.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import Gemma3nError
from .layers import LoRALinear
from .modules import MULTIMODAL_TEXT_PREFIX, TEXT_ONLY_TEXT_PREFIX, float_shape, hf_module_name, linear_paths, module_at, wrapped_at
from .reader import Lora
from .settings import LoraSettings

TEXT_DECODER = "language_model."


def text_prefix(model: nn.Module) -> str:
    """Where the text model sits in the Transformers model an adapter of `model` belongs to."""
    return MULTIMODAL_TEXT_PREFIX if model.config.is_multimodal else TEXT_ONLY_TEXT_PREFIX


def target_paths(model: nn.Module, settings: LoraSettings, towers: bool = False) -> list[str]:
    """Our paths of the Linears `settings` targets (PEFT's matching rules on Transformers' names)."""
    prefix = text_prefix(model)
    paths = [
        path for path in linear_paths(model)
        if (towers or path.startswith(TEXT_DECODER)) and settings.targets(hf_module_name(path, prefix), is_linear=True)
    ]
    if not paths:
        raise Gemma3nError(f"target modules {settings.target_modules!r} match no Linear layer of this model")
    return paths


def fresh_loras(model: nn.Module, settings: LoraSettings, paths: list[str], seed: int) -> dict[str, Lora]:
    """PEFT's default initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with
    a = sqrt(5)), B = 0, so the model starts out unchanged."""
    key = mx.random.key(seed)
    loras = {}
    prefix = text_prefix(model)
    for path, subkey in zip(paths, mx.random.split(key, len(paths))):
        rows, columns = float_shape(module_at(model, path))
        name = hf_module_name(path, prefix)
        rank, bound = settings.rank(name), 1.0 / math.sqrt(columns)
        a = mx.random.uniform(-bound, bound, (rank, columns), key=subkey)
        loras[path] = Lora(a, mx.zeros((rows, rank)), settings.scale(name))
    return loras


def attach_trainable(model: nn.Module, loras: dict[str, Lora], dropout: float = 0.0) -> list[LoRALinear]:
    """Put `loras` into the model as its only trainable parameters (float32 A and B)."""
    model.freeze()
    layers = []
    for path, lora in loras.items():
        layer = wrapped_at(model, path, LoRALinear)
        layer.set_lora(lora.a.astype(mx.float32), lora.b.astype(mx.float32), mx.array(lora.scale, dtype=mx.float32))
        layer.dropout = dropout
        layer.freeze(recurse=False)  # the scale too: set after the model was frozen
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
        layers.append(layer)
    return layers
