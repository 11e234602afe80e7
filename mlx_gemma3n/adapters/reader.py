"""A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), local or on the Hub, read and
checked against one base model before anything is applied.

PEFT names a LoRA pair `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` and a module
to save `base_model.model.<module>.<parameter>`, <module> being Transformers' name (multimodal
`model.language_model.layers.0...` or text-only `model.layers.0...`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import Gemma3nError
from ..weights.files import our_name, resolve_model_path, safetensors_names
from .modules import (
    LINEAR_TYPES, MULTIMODAL_TEXT_PREFIX, TEXT_ONLY_TEXT_PREFIX, float_shape, hf_module_name, linear_paths, module_at,
)
from .settings import LoraSettings, read_settings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}
UNSUPPORTED_SUFFIXES = {
    ".lora_embedding_A": "LoRA on an embedding", ".lora_embedding_B": "LoRA on an embedding",
    ".lora_magnitude_vector": "DoRA", ".lora_A.bias": "a LoRA bias", ".lora_B.bias": "a LoRA bias",
}
HEAD = "lm_head.weight"  # a tuned LM head: no parameter of ours (the head is the tied embedding)


@dataclass
class Lora:
    a: mx.array  # (r, in)
    b: mx.array  # (out, r)
    scale: float

    def delta(self, rows: slice = slice(None)) -> mx.array:
        """Rows of scale * B A, in float32: what fusing adds to the base weight."""
        return (self.scale * self.b[rows].astype(mx.float32)) @ self.a.astype(mx.float32)


@dataclass
class Adapter:
    name: str
    source: str
    loras: dict[str, Lora] = field(default_factory=dict)  # our module path -> its LoRA
    tuned: dict[str, mx.array] = field(default_factory=dict)  # our parameter name (or HEAD) -> tuned copy


def adapter_folder(path_or_hub_id: str | Path) -> Path:
    """A local adapter folder, or a hub id (only the adapter's two files are downloaded)."""
    folder = resolve_model_path(path_or_hub_id, patterns=[CONFIG_FILE, WEIGHTS_FILE], what="adapter")
    if not (folder / CONFIG_FILE).is_file():
        raise Gemma3nError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / "adapter_model.bin").is_file():
            raise Gemma3nError(f"{folder} has only adapter_model.bin (a pickle); save the adapter as safetensors")
        raise Gemma3nError(f"{folder} has no {WEIGHTS_FILE}")
    return folder


def read_adapter(path_or_hub_id: str | Path, model: nn.Module, name: str = "default", dtype=None) -> Adapter:
    """The adapter at `path_or_hub_id`, checked against `model` (a loaded model or a skeleton) and
    cast to its activation dtype (or `dtype`). Raises a one-line Gemma3nError for anything that does not fit."""
    folder = adapter_folder(path_or_hub_id)
    settings = read_settings(folder / CONFIG_FILE)
    if settings.use_dora:
        raise Gemma3nError(f"{folder / CONFIG_FILE}: use_dora is not supported (plain LoRA only)")
    file = folder / WEIGHTS_FILE
    safetensors_names(file)  # a truncated file fails here, by name
    try:
        tensors = mx.load(str(file))
    except Exception as exc:  # mx.load reports a corrupt file with a bare RuntimeError
        raise Gemma3nError(f"cannot read {file}: {exc}") from None
    pairs, saved = split_keys(tensors, settings, file)
    text_prefix = MULTIMODAL_TEXT_PREFIX if any(k.startswith(MULTIMODAL_TEXT_PREFIX) for k in [*pairs, *saved]) else TEXT_ONLY_TEXT_PREFIX
    adapter = Adapter(name, str(path_or_hub_id))
    dtype = dtype or activation_dtype(model)
    ignored = []
    for module_name, pair in pairs.items():
        path = our_module_path(module_name, model)
        if path is None:
            ignored.append(module_name)
            continue
        adapter.loras[path] = checked_lora(module_name, pair, module_at(model, path), settings, file, dtype)
    check_targets(model, settings, text_prefix, set(adapter.loras), file)
    for param_name, tensor in saved.items():
        ours, current = tuned_target(param_name, tensor, model, file)
        adapter.tuned[ours] = tensor.astype(current.dtype if mx.issubdtype(current.dtype, mx.floating) else dtype)
    if not adapter.loras and not adapter.tuned:
        raise Gemma3nError(f"{file}: the adapter changes nothing in this model")
    if ignored:
        print(f"[adapter] {name}: ignoring the LoRA weights of {len(ignored)} k/v projections of KV-shared layers "
              "(Gemma 3n does not use them)", file=sys.stderr)
    return adapter


def split_keys(tensors: dict, settings: LoraSettings, file: Path) -> tuple[dict, dict]:
    """({module: {"a", "b"}}, {parameter: tensor of a module to save}), Transformers' names."""
    pairs, saved = {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise Gemma3nError(f"{file}: unexpected tensor '{key}' (PEFT names start with '{PEFT_PREFIX}')")
        name = key[len(PEFT_PREFIX) :]
        unsupported = next((what for suffix, what in UNSUPPORTED_SUFFIXES.items() if name.endswith(suffix)), None)
        if unsupported:
            raise Gemma3nError(f"{file}: '{key}' is {unsupported}, which is not supported")
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            pairs.setdefault(name[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = tensor
        elif settings.is_saved_module(name.rpartition(".")[0]):
            saved[name] = tensor
        else:
            raise Gemma3nError(f"{file}: unexpected tensor '{key}' (neither a LoRA weight nor in modules_to_save)")
    return pairs, saved


def our_module_path(module_name: str, model: nn.Module) -> str | None:
    """Our path of a LoRA target; None for the unused k/v projections of KV-shared layers."""
    if module_name.endswith("lm_head"):
        raise Gemma3nError("LoRA on lm_head is not supported (Gemma 3n's LM head is the tied token embedding)")
    path = our_name(f"{module_name}.weight", model.config)
    return None if path is None else path[: -len(".weight")]


def checked_lora(module_name: str, pair: dict, module, settings: LoraSettings, file: Path, dtype) -> Lora:
    if module is None:
        raise Gemma3nError(f"{file}: LoRA weights for '{module_name}', which this model does not have (another base model?)")
    if not isinstance(module, LINEAR_TYPES):
        raise Gemma3nError(f"{file}: '{module_name}' is a {type(module).__name__}; LoRA is supported on Linear layers only")
    if set(pair) != {"a", "b"}:
        missing = "lora_B" if "a" in pair else "lora_A"
        raise Gemma3nError(f"{file}: '{module_name}' has no {missing}.weight")
    a, b = pair["a"], pair["b"]
    rows, columns = float_shape(module)
    rank = settings.rank(module_name)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != columns or b.shape[0] != rows:
        raise Gemma3nError(
            f"{file}: '{module_name}' LoRA shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the layer's "
            f"{rows} x {columns} weight (another base model?)"
        )
    if a.shape[0] != rank or b.shape[1] != rank:
        raise Gemma3nError(f"{file}: '{module_name}' has LoRA rank {a.shape[0]}/{b.shape[1]}, its config says r = {rank}")
    return Lora(a.astype(dtype), b.astype(dtype), settings.scale(module_name))


def check_targets(model: nn.Module, settings: LoraSettings, text_prefix: str, found: set[str], file: Path) -> None:
    """The config's targets in this model are exactly the modules the file has LoRA weights for."""
    expected = {p for p in linear_paths(model) if settings.targets(hf_module_name(p, text_prefix), is_linear=True)}
    if not expected and not settings.modules_to_save:
        raise Gemma3nError(f"{file.parent / 'adapter_config.json'}: target_modules {settings.target_modules!r} match no layer of this model")
    for missing, what in ((expected - found, "targets but the file has no weights for"), (found - expected, "has weights for but the config does not target")):
        if missing:
            example = hf_module_name(sorted(missing)[0], text_prefix)
            raise Gemma3nError(f"{file}: the adapter {what} {len(missing)} layer(s) of this model, e.g. '{example}' (another base model?)")


def tuned_target(param_name: str, tensor: mx.array, model: nn.Module, file: Path) -> tuple[str, mx.array]:
    """(our name, the model's parameter it replaces) for a tensor of a module to save, checked."""
    embedding = module_at(model, "language_model.embed_tokens")
    ours = HEAD if param_name == HEAD else our_name(param_name, model.config)
    module_path, _, kind = (ours or "").rpartition(".")
    module = embedding if ours == HEAD else module_at(model, module_path)
    if module is None or kind not in module:
        raise Gemma3nError(f"{file}: modules_to_save tensor '{param_name}' matches no parameter of this model")
    quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    if quantized and module is not embedding:
        raise Gemma3nError(f"{file}: modules_to_save '{module_path}' is quantized in this base model; use a float base")
    current = module[kind]
    shape = float_shape(module) if kind == "weight" and current.ndim == 2 else tuple(current.shape)
    if tuple(tensor.shape) != shape:
        raise Gemma3nError(f"{file}: modules_to_save tensor '{param_name}' has shape {tuple(tensor.shape)}, the model's is {shape}")
    return ours, current


def activation_dtype(model: nn.Module):
    """The dtype the model's activations are computed in (see loader.adapt_to_cpu)."""
    return model.activation_dtype or model.language_model.norm.weight.dtype
