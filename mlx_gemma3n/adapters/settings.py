"""A PEFT LoRA `adapter_config.json`: the options we honour, the ones we refuse, and PEFT's rules for
which modules it targets and at what rank and scale.

Module keys here are Hugging Face module names relative to the base model, as PEFT sees them
(`model.language_model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Gemma3nError

ALL_LINEAR = "all-linear"
# Initialisations that rewrite the base weights: such an adapter only fits its own modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options that change what the saved weights mean; any value but these "off" values is refused.
REFUSED_OPTIONS = {
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "modules_to_tie": (None, []),
    "ensure_weight_tying": (False, None),
}


@dataclass
class LoraSettings:
    r: int
    lora_alpha: float
    target_modules: str | list[str]
    use_rslora: bool = False
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    use_dora: bool = False

    def rank(self, key: str) -> int:
        return self.rank_pattern.get(pattern_key(self.rank_pattern, key), self.r)

    def scale(self, key: str) -> float:
        """PEFT's `scaling`: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (per-module r, alpha)."""
        rank = self.rank(key)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def is_saved_module(self, key: str) -> bool:
        return any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in self.modules_to_save)

    def targets(self, key: str, is_linear: bool) -> bool:
        """PEFT's `check_target_module_exists`, with "all-linear" meaning every Linear (the LM head,
        which PEFT leaves out, is no module of ours: it is the tied embedding)."""
        excluded = self.exclude_modules
        if isinstance(excluded, str) and re.fullmatch(excluded, key):
            return False
        if isinstance(excluded, list) and (key in excluded or any(key.endswith(f".{e}") for e in excluded)):
            return False
        if self.is_saved_module(key):
            return False
        if self.target_modules == ALL_LINEAR:
            return is_linear and self.in_transformed_layers(key)
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        return self.in_transformed_layers(key)

    def in_transformed_layers(self, key: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in patterns)), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_key(patterns: dict, key: str) -> str:
    """The first rank/alpha pattern that matches the end of `key` (PEFT's `get_pattern_key`)."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), key)


def read_settings(path: Path) -> LoraSettings:
    """The LoRA settings of an adapter_config.json, refusing what we cannot run exactly."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Gemma3nError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise Gemma3nError(f"{path} is not a JSON object")
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise Gemma3nError(f"{path}: peft_type {kind} is not supported (only LORA adapters)")
    if raw.get("bias", "none") != "none":
        raise Gemma3nError(f"{path}: bias '{raw['bias']}' is not supported (only bias 'none')")
    for option, off in REFUSED_OPTIONS.items():
        if raw.get(option) not in off:
            raise Gemma3nError(f"{path}: {option} = {raw[option]!r} is not supported")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise Gemma3nError(
            f"{path}: init_lora_weights '{raw['init_lora_weights']}' changes the base weights; save the adapter with "
            "PEFT's path_initial_model_for_weight_conversion to make it a plain LoRA of the original model"
        )
    for required in ("r", "lora_alpha", "target_modules"):
        if raw.get(required) is None:
            raise Gemma3nError(f"{path}: '{required}' is missing")
    targets = raw["target_modules"]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = ALL_LINEAR
    elif not isinstance(targets, str):
        targets = list(targets)
    try:
        return LoraSettings(
            r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), target_modules=targets,
            use_rslora=bool(raw.get("use_rslora")), exclude_modules=raw.get("exclude_modules"),
            layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            modules_to_save=list(raw.get("modules_to_save") or []), fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
            use_dora=bool(raw.get("use_dora")),
        )
    except (TypeError, ValueError) as exc:
        raise Gemma3nError(f"{path}: bad value ({exc})") from None
