"""Training checkpoints: a PEFT adapter folder plus the optimizer's state and the step reached.

Each checkpoint `ADAPTER_PATH/checkpoints/step-NNNNNNN` is written into a temporary folder and
renamed into place, so it exists whole or not at all; the adapter folder's own files are then
replaced by the newest ones, each file renamed into place. `--resume-adapter` takes either kind of
folder (or any PEFT adapter, which restarts the optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..adapters.writer import write_adapter
from ..errors import Gemma3nError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates made


def save_checkpoint(adapter_path: Path, config: dict, tensors: dict, optimizer, state: TrainerState) -> Path:
    """Write a checkpoint for `state.step` and make it the adapter folder's current content."""
    root = adapter_path / CHECKPOINTS
    final = root / f"step-{state.step:07d}"
    temporary = root / f".step-{state.step:07d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    write_adapter(temporary, config, tensors)
    mx.save_safetensors(str(temporary / OPTIMIZER_FILE), optimizer_state(optimizer))
    (temporary / STATE_FILE).write_text(json.dumps({"step": state.step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    for file in sorted(p.name for p in final.iterdir()):
        shutil.copyfile(final / file, adapter_path / f".{file}.tmp")
        os.replace(adapter_path / f".{file}.tmp", adapter_path / file)
    return final


def optimizer_state(optimizer) -> dict[str, mx.array]:
    """The optimizer's state, flat; the learning rate is left out (the schedule gives it from the step)."""
    return {k: v for k, v in tree_flatten(optimizer.state) if k != "learning_rate"}


def restore(folder: Path, optimizer, parameters: dict) -> TrainerState:
    """The trainer state saved in `folder` with the optimizer's state put back (a fresh state when
    the folder is a plain adapter)."""
    if not (folder / STATE_FILE).is_file():
        return TrainerState()
    try:
        step = int(json.loads((folder / STATE_FILE).read_text())["step"])
        saved = mx.load(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise Gemma3nError(f"cannot read the training state in {folder}: {exc}") from None
    optimizer.init(parameters)
    used = set()

    def saved_value(path: str, current: mx.array) -> mx.array:
        if path == "learning_rate":
            return current
        if path not in saved or saved[path].shape != current.shape:
            raise Gemma3nError(f"{folder / OPTIMIZER_FILE}: no state '{path}' of the right shape (another adapter or optimizer?)")
        used.add(path)
        return saved[path]

    optimizer.state = tree_map_with_path(saved_value, optimizer.state)
    if used != set(saved):
        raise Gemma3nError(f"{folder / OPTIMIZER_FILE}: {len(set(saved) - used)} state tensors do not fit (another optimizer?)")
    return TrainerState(step=step)
