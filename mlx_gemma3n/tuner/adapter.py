"""The adapter a run trains: a fresh LoRA over the chosen Linears, or an existing PEFT adapter's
weights and config (`--resume-adapter`); either way the model's only trainable parameters, and the
adapter_config.json the run writes with them."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..adapters.create import attach_trainable, fresh_loras, target_paths
from ..adapters.reader import CONFIG_FILE, adapter_folder, read_adapter
from ..adapters.settings import ALL_LINEAR, LoraSettings
from ..adapters.writer import exact_targets
from ..errors import Gemma3nError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def new_adapter(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=None,
                towers: bool = False, seed: int = 0, base_model: str | None = None) -> dict:
    """Attach a fresh LoRA (B = 0: the model starts unchanged); returns its PEFT config."""
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise Gemma3nError(f"bad LoRA settings: rank {rank} (>= 1), alpha {alpha} (> 0), dropout {dropout} (0 <= p < 1)")
    targets = list(targets or DEFAULT_TARGETS)
    settings = LoraSettings(r=rank, lora_alpha=alpha, target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets)
    paths = target_paths(model, settings, towers)
    attach_trainable(model, fresh_loras(model, settings, paths, seed), dropout)
    return {
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": exact_targets(model, paths),
        "base_model_name_or_path": base_model,
    }


def resumed_adapter(model: nn.Module, folder: str | Path, dropout: float | None = None) -> dict:
    """Attach the adapter in `folder` as the trainable one; returns its PEFT config (kept as it was,
    but for the dropout when one is given)."""
    folder = adapter_folder(folder)
    adapter = read_adapter(folder, model, "resumed", dtype=mx.float32)
    if adapter.tuned:
        raise Gemma3nError(f"{folder}: the adapter has modules_to_save; training them is not supported (LoRA only)")
    config = json.loads((folder / CONFIG_FILE).read_text())  # read_adapter has checked it
    dropout = config.get("lora_dropout", 0.0) if dropout is None else dropout
    attach_trainable(model, adapter.loras, dropout)
    return {**config, "lora_dropout": dropout}
