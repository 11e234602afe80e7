"""Several adapters over one base model: each is read once, and switching puts its arrays into the
wrapper layers (and takes the previous one's out) without touching the base weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import Gemma3nError
from .layers import LoRALinear, TunedEmbedding
from .modules import module_at, wrapped_at
from .reader import HEAD, Adapter, read_adapter

EMBEDDING = "language_model.embed_tokens"


class AdapterSet:
    """The adapters loaded over one model, and which one is active (None: the base model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
        self.originals: list[tuple[nn.Module, str, mx.array]] = []  # base parameters a module to save replaces

    def load(self, path: str | Path, name: str) -> None:
        if name in self.adapters:
            raise Gemma3nError(f"an adapter named '{name}' is already loaded")
        self.adapters[name] = read_adapter(path, self.model, name)
        self.activate(name)

    def activate(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise Gemma3nError(f"no adapter named '{name}' is loaded (loaded: {known})")
        self.clear()
        if name is not None:
            self.apply(self.adapters[name])
        self.active = name
        self.model.__dict__["_hard_tokens"] = None  # the multimodal hard-token table may have changed

    def clear(self) -> None:
        for _, module in self.model.named_modules():
            if isinstance(module, LoRALinear):
                module.set_lora()
            elif isinstance(module, TunedEmbedding):
                module.set_tables()
        for module, kind, original in self.originals:
            module[kind] = original
        self.originals = []

    def apply(self, adapter: Adapter) -> None:
        for path, lora in adapter.loras.items():
            scale = mx.array(lora.scale, dtype=lora.a.dtype)
            wrapped_at(self.model, path, LoRALinear).set_lora(lora.a, lora.b, scale)
        tables = {f"{EMBEDDING}.weight": "input_table", HEAD: "head_table"}
        if any(name in adapter.tuned for name in tables):
            wrapped_at(self.model, EMBEDDING, TunedEmbedding).set_tables(
                **{side: adapter.tuned.get(name) for name, side in tables.items()}
            )
        for name, tuned in adapter.tuned.items():
            if name in tables:
                continue
            module_path, _, kind = name.rpartition(".")
            module = module_at(self.model, module_path)
            self.originals.append((module, kind, module[kind]))
            module[kind] = tuned


def adapter_set(model: nn.Module) -> AdapterSet:
    adapters = model.__dict__.get("_adapter_set")
    if adapters is None:
        adapters = model.__dict__["_adapter_set"] = AdapterSet(model)
    return adapters
