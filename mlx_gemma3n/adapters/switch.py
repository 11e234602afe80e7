"""Several adapters over one base model: each is read once, and switching puts its arrays into the
wrapper layers (and takes the previous one's out) without touching the base weights. `ModelWithAdapters`
is the model `load` builds: Gemma 3n with `load_adapter` / `set_adapter`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..architecture.model import TOWERS, Model
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


class ModelWithAdapters(Model):
    """Gemma 3n that runs PEFT LoRA adapters over its weights, unfused, switched by name."""

    def __init__(self, config, towers: tuple[str, ...] = TOWERS):
        super().__init__(config, towers)
        self.__dict__["adapter_set"] = AdapterSet(self)  # not a child module: no parameters of its own

    def load_adapter(self, path_or_hub_id, name: str = "default") -> None:
        """Read a PEFT LoRA adapter (folder or hub id) over this model and make it the active one."""
        self.adapter_set.load(path_or_hub_id, name)

    def set_adapter(self, name: str | None) -> None:
        """Switch to a loaded adapter by name, or back to the base model with None."""
        self.adapter_set.activate(name)

    def fingerprint_parts(self) -> list[bytes]:
        """The base model's, and the active adapter's name and source: a file made under one adapter
        does not fit another."""
        adapters = self.adapter_set
        if adapters.active is None:
            return super().fingerprint_parts()
        return [*super().fingerprint_parts(), f"adapter {adapters.active} {adapters.adapters[adapters.active].source}".encode()]
