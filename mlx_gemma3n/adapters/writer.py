"""A model's LoRA layers written as a PEFT folder (adapter_config.json + adapter_model.safetensors),
the inverse of `reader`: PEFT's tensor names under Transformers' module names, float32 weights, and
a config whose `target_modules` selects exactly the layers that carry weights (by PEFT's rules, so
PeftModel.from_pretrained and our reader build the same layers)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .create import text_prefix
from .layers import LoRALinear
from .modules import hf_module_name, linear_paths
from .reader import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
from .settings import LoraSettings

PEFT_DEFAULTS = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
    "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Our path -> each LoRA layer of the model that holds an adapter."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear) and "lora_a" in m}


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA matrices under PEFT's names, in float32."""
    prefix = text_prefix(model)
    tensors = {}
    for path, layer in lora_layers(model).items():
        name = PEFT_PREFIX + hf_module_name(path, prefix)
        tensors[f"{name}.lora_A.weight"] = layer.lora_a.astype(mx.float32)
        tensors[f"{name}.lora_B.weight"] = layer.lora_b.astype(mx.float32)
    return tensors


def leaf_name(name: str) -> str:
    """A module's own name: its last part, with its list's name for a list item (`altup_projections.0`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def exact_targets(model: nn.Module, paths: list[str]) -> str:
    """A `target_modules` regex that PEFT's rules match to exactly `paths` among the model's Linears:
    their own names under the text model (or the whole model), else every name spelled out."""
    prefix = text_prefix(model)
    names = [hf_module_name(p, prefix) for p in paths]
    scope = prefix if all(p.startswith("language_model.") for p in paths) else "model."
    leaves = sorted({leaf_name(n) for n in names})
    regex = rf"{re.escape(scope)}(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"
    settings = LoraSettings(r=1, lora_alpha=1, target_modules=regex)
    matched = {p for p in linear_paths(model) if settings.targets(hf_module_name(p, prefix), is_linear=True)}
    return regex if matched == set(paths) else "|".join(map(re.escape, names))


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, mx.array]) -> None:
    """Write a PEFT folder; each file goes to a temporary name first and is renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = folder / f".tmp-{WEIGHTS_FILE}", folder / f".tmp-{CONFIG_FILE}"  # mx.save_safetensors wants the suffix
    mx.save_safetensors(str(weights_tmp), tensors, metadata={"format": "pt"})
    config_tmp.write_text(json.dumps({**PEFT_DEFAULTS, **config}, indent=2) + "\n")
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
    os.replace(config_tmp, folder / CONFIG_FILE)
