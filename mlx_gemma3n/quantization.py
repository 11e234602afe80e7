"""Which modules are quantized, at how many bits (recipes), and quantizing a model to match a folder.

A converted folder's config.json carries a `quantization` block: the default `bits`, `group_size` and
`mode`, plus an entry per module whose settings differ (a dict) or that stays float (false).
"""

from __future__ import annotations

from typing import Callable

import mlx.nn as nn

from .errors import Gemma3nError

# AltUp's coefficient and router matrices and LAuReL's rank-64 side path are tiny and sensitive;
# the vision and audio towers stay float for now (their convolutions must, their linears untried).
FLOAT_SUBMODULES = (".altup.", ".laurel.")
FLOAT_PREFIXES = ("vision_tower.", "audio_tower.")
# MLX's quantization modes: affine has float scales and biases, the others uint8 scales only.
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


def is_quantizable(path: str, module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Linear, nn.Embedding))
        and not any(part in f"{path}." for part in FLOAT_SUBMODULES)
        and not path.startswith(FLOAT_PREFIXES)
    )


def _head_and_attention_at_8(path: str) -> int:
    """Chosen by benchmarks/quant_quality.py: the token embedding (= tied LM head) is the most
    sensitive group, attention and MLP follow with equal gains but attention is ~5x smaller; the PLE
    table is the least sensitive (and the largest), so it stays at 4 bits."""
    return 8 if path.endswith("embed_tokens") or ".self_attn." in path else 4


RECIPES: dict[str, Callable[[str], int]] = {
    "uniform4": lambda path: 4,
    "uniform8": lambda path: 8,
    "mixed": _head_and_attention_at_8,
}


def quantization_plan(model: nn.Module, recipe: str, group_size: int) -> tuple[dict, list[str]]:
    """({module path: {"bits", "group_size"}}, paths left float because their width does not divide)."""
    if recipe not in RECIPES:
        raise Gemma3nError(f"unknown quantization recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    bits_for = RECIPES[recipe]
    plan, left_float = {}, []
    for path, module in model.named_modules():
        if not is_quantizable(path, module):
            continue
        if module.weight.shape[-1] % group_size:
            left_float.append(path)
        else:
            plan[path] = {"bits": bits_for(path), "group_size": group_size}
    return plan, left_float


def config_block(plan: dict, left_float: list[str], recipe: str, bits: int, group_size: int) -> dict:
    block = {"group_size": group_size, "bits": bits, "mode": "affine", "recipe": recipe}
    block.update({path: params for path, params in plan.items() if params != {"bits": bits, "group_size": group_size}})
    block.update({path: False for path in left_float})
    return block


def module_entries_renamed(block: dict, rename: Callable[[str], str | None]) -> dict:
    """The block with its per-module entries (a dict or false) keyed by `rename(path)`; entries whose
    module `rename` drops (None) are left out. Other folders' tools key them by their own paths."""
    renamed = {}
    for key, value in block.items():
        if isinstance(value, (dict, bool)):
            key = rename(key)
        if key is not None:
            renamed[key] = value
    return renamed


def quantize_like_checkpoint(model: nn.Module, block: dict, weight_names: set[str]) -> None:
    """Turn into quantized layers exactly the modules whose weights the checkpoint stores quantized,
    with the block's `group_size`, `bits` and `mode` (affine, mxfp4, mxfp8, nvfp4), or with a module's
    own entry. As MLX's loaders read an entry, its missing keys take MLX's defaults, not the block's
    (a mode's own group size and bits; affine: 64 and 4)."""
    mode = block.get("mode", "affine")
    if mode not in MODES:
        raise Gemma3nError(f"config.json quantization mode '{mode}' is not one of MLX's ({', '.join(MODES)})")

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weight_names:
            return False
        entry = block.get(path)
        return dict(entry) if isinstance(entry, dict) else True

    nn.quantize(model, block.get("group_size"), block.get("bits"), mode=mode, class_predicate=predicate)
