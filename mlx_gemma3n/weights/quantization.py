"""Which modules are quantized, at how many bits (recipes), and quantizing a model to match a folder.

A converted folder's config.json carries a `quantization` block: the default `bits`, `group_size` and
`mode`, plus an entry per module whose settings differ (a dict) or that stays float (false).
"""

from __future__ import annotations

from typing import Callable

import mlx.nn as nn

from ..architecture.vision import Conv2d
from ..errors import Gemma3nError

# AltUp's coefficient and router matrices and LAuReL's rank-64 side path are tiny and sensitive.
# The towers quantize only when asked (`tower_bits`): the audio conformer's Linears and the vision
# tower's pointwise convolutions (vision.Conv2d.to_quantized); their other convolutions stay float.
FLOAT_SUBMODULES = (".altup.", ".laurel.")
TOWER_PREFIXES = ("vision_tower.", "audio_tower.")
# MLX's quantization modes: affine has float scales and biases, the others uint8 scales only and a
# fixed (bits, group size).
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


def is_quantizable(path: str, module: nn.Module, towers: bool = False) -> bool:
    if path.startswith(TOWER_PREFIXES):
        return towers and (isinstance(module, nn.Linear) or (isinstance(module, Conv2d) and module.pointwise))
    return isinstance(module, (nn.Linear, nn.Embedding)) and not any(part in f"{path}." for part in FLOAT_SUBMODULES)


def _head_and_attention_at_8(path: str) -> int:
    """Chosen by benchmarks/quant_quality.py: the token embedding (= tied LM head) is the most
    sensitive group, attention and MLP follow with equal gains but attention is ~5x smaller; the PLE
    table is the least sensitive (and the largest), so it stays at 4 bits."""
    return 8 if path.endswith("embed_tokens") or ".self_attn." in path else 4


def _mlp_at_3(path: str) -> int:
    """The lean recipe, for E4B in <= 2.3 GB (benchmarks/quant_quality.py, quant_memory.py): the MLP
    holds ~80% of the resident weights, and of the three large groups it costs the least KL alone
    at 4 bits and at 3 on both tiny checkpoints, so it alone drops to 3 bits. The PLE table, the
    least sensitive, stays at 4: it is memory-mapped, so its bits cost disk, not memory."""
    return 3 if ".mlp." in path else 4


RECIPES: dict[str, Callable[[str], int]] = {
    **{f"uniform{bits}": (lambda path, bits=bits: bits) for bits in AFFINE_BITS},
    "mixed": _head_and_attention_at_8,
    "mixed3": _mlp_at_3,
}


def module_params(bits: int, group_size: int, mode: str, path: str, recipe: str) -> dict:
    """A module's quantization settings. In affine mode the recipe's bits at `group_size`; in a
    float mode (fixed bits and group), its 4-bit modules take `mode` and its 8-bit ones mxfp8."""
    if mode == "affine":
        return {"bits": bits, "group_size": group_size}
    chosen = mode if FLOAT_MODES[mode][0] == bits else next((m for m, (b, _) in FLOAT_MODES.items() if b == bits), None)
    if chosen is None:
        raise Gemma3nError(f"recipe {recipe} puts {path} at {bits} bits, which no float mode has (mxfp4/nvfp4: 4, mxfp8: 8); use --q-mode affine")
    bits, group_size = FLOAT_MODES[chosen]
    return {"bits": bits, "group_size": group_size, "mode": chosen}


def quantization_plan(model: nn.Module, recipe: str, group_size: int, mode: str = "affine",
                      tower_bits: int | None = None) -> tuple[dict, list[str]]:
    """({module path: {"bits", "group_size"[, "mode"]}}, paths left float because their width does not
    divide); `tower_bits`: the towers' Linears and pointwise convolutions too, at these bits (in a
    float mode: 8 -> mxfp8, 4 -> the mode)."""
    if recipe not in RECIPES:
        raise Gemma3nError(f"unknown quantization recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    if tower_bits is not None and tower_bits not in AFFINE_BITS:
        raise Gemma3nError(f"--quantize-towers takes bits in {', '.join(map(str, AFFINE_BITS))}, got {tower_bits}")
    recipe_bits = RECIPES[recipe]

    def bits_for(path: str) -> int:
        return tower_bits if path.startswith(TOWER_PREFIXES) else recipe_bits(path)

    plan, left_float = {}, []
    for path, module in model.named_modules():
        if not is_quantizable(path, module, tower_bits is not None):
            continue
        params = module_params(bits_for(path), group_size, mode, path, recipe)
        if module.weight.shape[-1] % params["group_size"]:
            left_float.append(path)
        else:
            plan[path] = params
    return plan, left_float


def config_block(plan: dict, left_float: list[str], recipe: str, default: dict) -> dict:
    """config.json's block: `default` ({"bits", "group_size"[, "mode"]}) at the top, an entry for each
    module quantized otherwise (e.g. an mxfp8 module in an mxfp4 folder), false for float ones."""
    block = {"group_size": default["group_size"], "bits": default["bits"], "mode": default.get("mode", "affine"), "recipe": recipe}
    block.update({path: params for path, params in plan.items() if params != default})
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
