"""A model folder's config.json + safetensors (single file or sharded) -> Model (files.py finds the
folder, locally or on the Hugging Face Hub, and its weight files).

Weights are read from safetensors only (never pickle). Every shard is checked against its own header
before use, so a truncated or corrupt file is reported by name.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..architecture.config import ModelConfig, load_config
from ..architecture.model import TOWERS, Model
from ..architecture.stacking import stack_projections
from ..backends.cpu_split import split_elementwise, split_over_cores
from ..errors import Gemma3nError
from .files import our_name, weight_files
from .mapped import MappedEmbedding, TensorLocation, locate, read_header
from .matformer import slice_at_load
from .quantization import module_entries_renamed, quantize_like_checkpoint

MAPPED_TABLE = "language_model.embed_tokens_per_layer"
EMBEDDERS = ("embed_vision.", "embed_audio.")
COMPUTE_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def clip_altup_coefficients(weights: dict, config: ModelConfig) -> None:
    """AltUp clips its coefficient matrices to +-altup_coef_clip; do it once here, not per step."""
    clip = config.text.altup_coef_clip
    if clip is None:
        return
    for name in weights:
        if name.endswith(("altup.prediction_coefs.weight", "altup.correction_coefs.weight")):
            weights[name] = mx.clip(weights[name], -clip, clip)


def read_weights(model_dir: Path, config: ModelConfig) -> tuple[dict, dict, dict[str, TensorLocation]]:
    """Our-named weights of the text model and embedders; each tower's weights (names relative to the
    tower); and where the PLE table's tensors lie in their files (memory-mapped, not loaded)."""
    weights, towers, mapped = {}, {tower: {} for tower in TOWERS}, {}
    for file in weight_files(model_dir):
        data_start, header = read_header(file)
        try:
            tensors = mx.load(str(file))
        except Exception as exc:  # mx.load reports a corrupt file with a bare RuntimeError
            raise Gemma3nError(f"cannot read {file}: {exc}") from None
        for hf_name, value in tensors.items():
            name = our_name(hf_name, config)
            if name is None:
                continue
            head, _, rest = name.partition(".")
            if head in towers:
                towers[head][rest] = value
                continue
            module_path, _, kind = name.rpartition(".")
            location = locate(file, hf_name, data_start, header) if module_path == MAPPED_TABLE else None
            if location is not None:
                mapped[kind] = location
                continue
            weights[name] = value
    clip_altup_coefficients(weights, config)
    return weights, {tower: w for tower, w in towers.items() if w}, mapped


def check_names(model: Model, names: set[str]) -> None:
    """Every parameter of the model is among `names` (the checkpoint's, ours) and nothing else is."""
    expected = {name for name, _ in tree_flatten(model.parameters())}
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        raise Gemma3nError("checkpoint does not match the Gemma 3n config: " + "; ".join(lines))


def map_table(model: Model, mapped: dict[str, TensorLocation], dtype, columns: dict | None = None) -> None:
    """Serve the PLE table from its file: the module becomes a MappedEmbedding (no parameters);
    `columns`: the columns read of each part (a MatFormer slice's layers)."""
    table = model.language_model.embed_tokens_per_layer
    quantization = {"group_size": table.group_size, "bits": table.bits, "mode": table.mode} if "scales" in mapped else {}
    model.language_model.embed_tokens_per_layer = MappedEmbedding(mapped, dtype=dtype, columns=columns, **quantization)


def adapt_to_cpu(model: Model, dtype, batched: bool = False) -> None:
    """MLX's CPU backend runs a matmul on one core, and slowly outside float32; Metal needs none of
    this. The matmuls and the logits' soft cap are split over the cores (`cpu_split`), and:
    - quantized models compute in float32: the CPU quantized matmul is ~10x faster with float32
      activations than with bf16 (measured: 42 vs 403 ms for a 262400 x 256 int4 matvec);
    - unless `batched` (several sequences decode in one step: the server), a bf16/fp16 tied embedding
      is held in float32: its LM-head matvec, the largest of a decode step, runs 1.7x faster so
      (measured: 70 vs 122 ms for 262400 x 512) for the table's size in memory. Looked-up rows are
      cast back to the weights' dtype, so the decoder sees the same numbers. The float32 matmul (the
      reference BLAS) costs B rows B times one, where the bf16 one batches (262400 x 256, B = 1 / 4 /
      8: float32 57 / 227 / 442 ms, bf16 62 / 130 / 191), so a batched model keeps the bf16 table and
      its logits are bf16, as on Metal."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    table = model.language_model.embed_tokens
    if model.config.quantization and dtype is None:
        model.activation_dtype = mx.float32
    elif not batched and type(table) is nn.Embedding and table.weight.dtype in (mx.bfloat16, mx.float16):
        model.activation_dtype = table.weight.dtype
        table.weight = table.weight.astype(mx.float32)
    split_over_cores(model)
    model.elementwise = split_elementwise


def our_module_path(path: str, config: ModelConfig) -> str | None:
    """Our path of a checkpoint's module (e.g. a quantization entry's key), or None for one we drop."""
    name = our_name(f"{path}.weight", config)
    return name and name.removesuffix(".weight")


def our_quantization_block(config: ModelConfig) -> dict:
    """config.json's quantization block with its per-module entries under our module paths."""
    return module_entries_renamed(config.quantization, lambda path: our_module_path(path, config))


def text_part(config: ModelConfig) -> ModelConfig:
    """The text model's config: mlx-lm's folders keep the multimodal config.json but only the text
    model's weights (no embedders, no towers)."""
    return replace(config, model_type="gemma3n_text", vision=None, audio=None, vision_tower={}, audio_tower={})


def load_model(model_dir: Path, dtype=None, matformer=None, batched: bool = False, model_class: type[Model] = Model) -> Model:
    """matformer: a MatFormer slice (a name from its table or a JSON spec, see matformer.py) cut from
    the folder's weights as they are read. batched: the model will decode several sequences per step
    (see `adapt_to_cpu`). model_class: what is built, Model or a subclass (adapters.ModelWithAdapters
    runs PEFT adapters)."""
    config = load_config(model_dir)
    weights, towers, mapped = read_weights(model_dir, config)
    table_columns = None
    if matformer is not None:
        config, weights, table_columns = slice_at_load(matformer, model_dir, config, weights, mapped)
    if config.is_multimodal and not any(name.startswith(EMBEDDERS) for name in weights):
        config = text_part(config)
    if config.quantization:
        config = replace(config, quantization=our_quantization_block(config))
    model = model_class(config, towers=tuple(towers) if config.is_multimodal else ())
    for tower, tower_weights in towers.items():
        weights.update({f"{tower}.{k}": v for k, v in model[tower].sanitize(tower_weights).items()})
    if config.quantization:
        quantize_like_checkpoint(model, config.quantization, set(weights) | {f"{MAPPED_TABLE}.{k}" for k in mapped})
    if dtype is not None:
        dtype = COMPUTE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if mapped:
        map_table(model, mapped, dtype, table_columns)
    check_names(model, set(weights))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights  # the model holds them now; stacking replaces some, which must not stay alive here
    adapt_to_cpu(model, dtype, batched)
    stack_projections(model)
    model.eval()
    # The towers' weights stay in their files until an image or a clip needs them (mx.load is lazy).
    mx.eval([v for k, v in tree_flatten(model.parameters()) if not k.startswith(TOWERS)])
    return model
