"""Our weight names and layouts back to a Transformers checkpoint's: Google-style names
(`model.language_model.`, `model.vision_tower.`, ...; text-only `model.`) and PyTorch convolution
layouts (the inverse of the towers' `sanitize`). Used by the converter's `--hf-format` output."""

from __future__ import annotations

import mlx.core as mx

from ..architecture.audio import AudioEncoder
from ..architecture.vision import VisionTower

TOWER_CLASSES = {"vision_tower": VisionTower, "audio_tower": AudioEncoder}


def hf_name(name: str, multimodal: bool) -> str:
    head, _, rest = name.partition(".")
    if head == "language_model":
        return ("model.language_model." if multimodal else "model.") + rest
    return f"model.{name}"


def to_torch_axes(tower: str, name: str, ndim: int) -> tuple[int, ...] | None:
    """The transpose taking an MLX-layout tower tensor to PyTorch's (None: both are the same)."""
    if ndim == 4 and (tower == "vision_tower" or name.endswith(".conv.weight")):
        return (0, 3, 1, 2)  # (O, kH, kW, I) -> (O, I, kH, kW)
    if ndim == 3 and tower == "audio_tower" and name.endswith("depthwise_conv1d.weight"):
        return (0, 2, 1)  # (C, K, 1) -> (C, 1, K)
    return None


def stored_in_torch_layout(tower: str, shapes: dict[str, tuple]) -> set[str]:
    """Which of a tower's tensors (names relative to it, with their shapes in the source files) are
    stored in PyTorch's layout: those the tower's own `sanitize` transposes, run on shape-only (lazy)
    stand-ins."""
    stand_ins = {name: mx.zeros(shape) for name, shape in shapes.items()}
    canonical = TOWER_CLASSES[tower].sanitize(stand_ins)
    return {name for name, stand_in in stand_ins.items() if canonical[name] is not stand_in}


def torch_layout_fixes(tower: str, shapes: dict[str, tuple]) -> dict[str, tuple[int, ...]]:
    """For a tower's tensors (names relative to it, with their shapes in the source files): the
    transposes that bring those stored in MLX layout to PyTorch's."""
    in_torch_layout = stored_in_torch_layout(tower, shapes)
    fixes = {}
    for name, shape in shapes.items():
        axes = to_torch_axes(tower, name, len(shape))
        if axes is not None and name not in in_torch_layout:
            fixes[name] = axes
    return fixes

