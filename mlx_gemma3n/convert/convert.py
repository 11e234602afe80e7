"""The conversion pipeline: validate everything, stream tensors shard by shard, write atomically.

Nothing is written before the source has been checked (config, every shard's header, the complete
set of weight names). The output goes to a temporary folder beside the destination and is renamed
into place at the end, so an interrupted run leaves no folder that `load()` would accept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma3n.adapters import read_adapter
from mlx_gemma3n.adapters.reader import HEAD
from mlx_gemma3n.adapters.switch import EMBEDDING
from mlx_gemma3n.architecture.config import ModelConfig, read_config
from mlx_gemma3n.architecture.model import TOWERS, Model
from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.weights.hf_export import hf_name, stored_in_torch_layout, torch_layout_fixes
from mlx_gemma3n.weights.files import our_name, resolve_model_path, safetensors_names, weight_files
from mlx_gemma3n.weights.loader import COMPUTE_DTYPES, check_names
from mlx_gemma3n.weights.mapped import SAFETENSORS_DTYPES, TensorLocation, locate, read_header
from mlx_gemma3n.weights.matformer import CutLocation, Slicing, resolve_spec
from mlx_gemma3n.weights.quantization import (
    AFFINE_BITS, AFFINE_GROUP_SIZES, FLOAT_MODES, MODES, RECIPES, config_block, quantization_plan,
    quantize_like_checkpoint,
)

from .progress import with_progress
from .shards import ShardWriter

# Files copied beside the weights: tokenizer, chat template, processor and generation configs.
COPIED_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "processor_config.json", "preprocessor_config.json",
)
MAX_SHARD_BYTES = 5 * 1024**3
CHUNK_BYTES = 256 * 1024**2


def source_names(files: list[Path], config: ModelConfig) -> set[str]:
    return {name for file in files for name in map(lambda n: our_name(n, config), safetensors_names(file)) if name}


def prepare_destination(dst: Path, force: bool) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise Gemma3nError(f"{dst} exists and is not empty; pass --force to replace it")


def model_card(src: str, dst: Path, dtype: str, block: dict | None) -> str:
    how = f"python -m mlx_gemma3n.convert --hf-path {src} --mlx-path {dst.name} --dtype {dtype}"
    if block:
        how += f" -q --q-mode {block['mode']} --quant-recipe {block['recipe']} --q-group-size {block['group_size']}"
        weights = f"quantized ({block['recipe']}: {block['mode']}, group size {block['group_size']}), float parts in {dtype}"
    else:
        weights = dtype
    return (
        f"---\nlibrary_name: mlx\nbase_model: {src}\ntags: [mlx, gemma3n]\n---\n\n"
        f"# {dst.name}\n\nConverted from [{src}](https://huggingface.co/{src}) for "
        f"[mlx-gemma3n](https://github.com/) with:\n\n```bash\n{how}\n```\n\nWeights: {weights}.\n\n"
        "```python\nfrom mlx_gemma3n import load\nfrom mlx_gemma3n.generate import generate\n\n"
        f'model, processor = load("{dst.name}")\nprint(generate(model, processor, "Hello!"))\n```\n'
    )


@dataclass
class WeightPlan:
    """What becomes of each source tensor (by module path, our names)."""

    dtype: mx.Dtype  # of the float tensors written
    quantize: dict = field(default_factory=dict)  # -> {"bits", "group_size"[, "mode"]}: quantized in the output
    packed: dict = field(default_factory=dict)  # -> {"bits", "group_size"[, "mode"]}: quantized in the source
    loras: dict = field(default_factory=dict)  # -> adapters.Lora fused into the weight
    tuned: dict = field(default_factory=dict)  # parameter name -> its replacement (modules_to_save)
    hf_format: bool = False  # Transformers' names and layouts
    conv_shapes: dict = field(default_factory=dict)  # 4-D parameter name -> its shape in a float model (MLX layout)
    multimodal: bool = True
    matformer: Slicing | None = None  # the MatFormer slice written (source tensors cut as they are read)

    def add_adapter(self, adapter) -> None:
        if f"{EMBEDDING}.weight" in adapter.tuned or HEAD in adapter.tuned:
            raise Gemma3nError(
                "the adapter tunes embed_tokens / lm_head (modules_to_save): fused, the LM head would no longer be "
                "the token embedding; run it unfused (load(..., adapter_path=...) or --adapter-path)"
            )
        self.loras, self.tuned = adapter.loras, adapter.tuned

    def output_name(self, name: str) -> str:
        return hf_name(name, self.multimodal) if self.hf_format else name


def packed_modules(model: Model) -> dict:
    return {path: {"bits": m.bits, "group_size": m.group_size, **({"mode": m.mode} if m.mode != "affine" else {})}
            for path, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def quantization_default(bits: int | None, group_size: int | None, mode: str) -> dict:
    """The folder's default settings from --q-bits / --q-group-size / --q-mode (None: the mode's own)."""
    if mode not in MODES:
        raise Gemma3nError(f"unknown --q-mode '{mode}' (choose from {', '.join(MODES)})")
    if mode == "affine":
        bits, group_size = bits or 4, group_size or 64
        if bits not in AFFINE_BITS:
            raise Gemma3nError(f"--q-bits must be one of {', '.join(map(str, AFFINE_BITS))}, got {bits}")
        if group_size not in AFFINE_GROUP_SIZES:
            raise Gemma3nError(f"--q-group-size must be one of {', '.join(map(str, AFFINE_GROUP_SIZES))}, got {group_size}")
        return {"bits": bits, "group_size": group_size}
    own_bits, own_group = FLOAT_MODES[mode]
    if (bits or own_bits, group_size or own_group) != (own_bits, own_group):
        raise Gemma3nError(f"--q-mode {mode} has {own_bits} bits in groups of {own_group}; drop --q-bits / --q-group-size")
    return {"bits": own_bits, "group_size": own_group, "mode": mode}


def float_config(raw_config: dict, dtype: str) -> dict:
    """The source's config.json for float weights in `dtype` (no quantization block)."""
    return dict({k: v for k, v in raw_config.items() if k != "quantization"}, dtype=dtype, torch_dtype=dtype)


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    quant_recipe: str | None = None,
    q_mode: str = "affine",
    q_tower_bits: int | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    adapter_path: str | None = None,
    dequantize: bool = False,
    hf_format: bool = False,
    matformer=None,
    quiet: bool = False,
) -> Path:
    """Convert a Gemma 3n checkpoint (folder or hub id) into an MLX folder; returns its path.

    adapter_path: a PEFT LoRA adapter (folder or hub id) fused into the weights. A quantized source
    (an MLX folder) stays quantized, its fused layers re-quantized with their settings, unless
    `dequantize`. hf_format: write a Transformers checkpoint instead (float weights, Google's names).
    matformer: write this MatFormer slice of an E4B source (a table name or a JSON spec, see matformer.py).
    q_bits / q_group_size: affine mode's (default 4 and 64); q_mode: affine or one of MLX's float
    modes (mxfp4, mxfp8, nvfp4: their own bits and group size). q_tower_bits: quantize the audio
    tower's Linears and the vision tower's pointwise convolutions too, at these bits (None: float).
    quiet: no progress bar (there is one on stderr when it is a terminal).
    """
    if dtype not in COMPUTE_DTYPES:
        raise Gemma3nError(f"unknown dtype '{dtype}' (choose from {', '.join(COMPUTE_DTYPES)})")
    if q_tower_bits is not None and not quantize:
        raise Gemma3nError("--quantize-towers quantizes the towers along with the decoder: add -q")
    default = quantization_default(q_bits, q_group_size, q_mode) if quantize else None
    recipe = quant_recipe or f"uniform{default['bits'] if default else 4}"
    if quantize and recipe not in RECIPES:
        raise Gemma3nError(f"unknown quantization recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    if quantize and hf_format:
        raise Gemma3nError("a Transformers checkpoint (--hf-format) has float weights: drop -q")
    dst = Path(mlx_path).expanduser().absolute()
    prepare_destination(dst, force)
    src = resolve_model_path(hf_path)
    raw_config = read_config(src)
    config = ModelConfig.from_dict(raw_config)
    files = weight_files(src)
    found = source_names(files, config)
    slicing = None
    if matformer is not None:
        shapes = {name: location.shape for name, location in source_locations(files, config).items()}
        slicing = Slicing.check(resolve_spec(matformer), config.text, shapes)
        raw_config, found = slicing.sliced_config(raw_config), {slicing.renamed(n) for n in found} - {None}
    towers = tuple(t for t in TOWERS if any(name.startswith(f"{t}.") for name in found))
    skeleton = Model(ModelConfig.from_dict(raw_config), towers=towers if config.is_multimodal else ())  # lazy
    conv_shapes = {name: tuple(value.shape) for name, value in tree_flatten(skeleton.parameters()) if value.ndim == 4}
    source_block = raw_config.get("quantization")
    if source_block:
        if quantize:
            raise Gemma3nError(f"{src} is already quantized; quantize its float checkpoint instead")
        quantize_like_checkpoint(skeleton, source_block, found)
    check_names(skeleton, found)
    plan = WeightPlan(COMPUTE_DTYPES[dtype], packed=packed_modules(skeleton), hf_format=hf_format,
                      multimodal=config.is_multimodal, matformer=slicing, conv_shapes=conv_shapes)
    if adapter_path is not None:
        plan.add_adapter(read_adapter(adapter_path, skeleton))

    block = None
    if quantize:
        plan.quantize, left_float = quantization_plan(skeleton, recipe, default["group_size"], q_mode, q_tower_bits)
        for path in left_float:
            print(f"[convert] {path} stays float: its width does not divide into its quantization groups", file=sys.stderr)
        block = config_block(plan.quantize, left_float, recipe, default)
    elif source_block and not (dequantize or hf_format):
        plan.quantize, block = dict(plan.packed), source_block

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_weights(files, config, plan, ShardWriter(tmp, max_shard_bytes), quiet)
        out_config = float_config(raw_config, dtype)
        if block:
            out_config["quantization"] = block
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2))
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if not hf_format:
            (tmp / "README.md").write_text(model_card(str(hf_path), dst, dtype, block))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_rows(location: TensorLocation, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of a tensor, read from its file into a fresh buffer (nothing stays mapped)."""
    if isinstance(location, CutLocation):
        return location.read(start, stop)
    np_dtype, mx_dtype = SAFETENSORS_DTYPES[location.dtype]
    row = int(np.prod(location.shape[1:], dtype=np.int64))
    offset = location.offset + start * row * np.dtype(np_dtype).itemsize
    values = np.fromfile(location.file, dtype=np_dtype, count=(stop - start) * row, offset=offset)
    return mx.array(values).view(mx_dtype).reshape(stop - start, *location.shape[1:])


@dataclass
class Packed:
    """A quantized source weight's scales and biases, and its settings."""

    scales: TensorLocation
    biases: TensorLocation | None
    bits: int
    group_size: int
    mode: str = "affine"

    def dequantized(self, packed: mx.array, start: int, stop: int) -> mx.array:
        biases = None if self.biases is None else read_rows(self.biases, start, stop)
        return mx.dequantize(packed, read_rows(self.scales, start, stop), biases, group_size=self.group_size,
                             bits=self.bits, mode=self.mode)


def converted(location: TensorLocation, params: dict | None, dtype, packed: Packed | None = None, lora=None) -> dict[str, mx.array]:
    """One tensor cast to `dtype` (None: kept) or quantized when `params`, in row chunks of
    ~CHUNK_BYTES, each evaluated before the next is read: peak memory is one chunk plus the output,
    whatever the tensor's size. A `packed` source is dequantized first; a `lora` is fused in."""
    if not location.shape:  # a scalar is one row of one value
        location = TensorLocation(location.file, location.dtype, (1,), location.offset)
        return {kind: t.reshape(()) for kind, t in converted(location, params, dtype).items()}
    rows = location.shape[0]
    columns = int(np.prod(location.shape[1:], dtype=np.int64)) * (32 // packed.bits if packed else 1)
    step = max(1, CHUNK_BYTES // max(1, columns * 4))
    pieces = []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = read_rows(location, start, stop)
        if packed:
            chunk = packed.dequantized(chunk, start, stop)
        if lora is not None:
            chunk = chunk.astype(mx.float32) + lora.delta(slice(start, stop))
        if params:
            chunk = chunk.reshape(chunk.shape[0], -1)  # a pointwise convolution's (O, I, 1, 1): a matrix
            # In float32: rounding to `dtype` first would round twice. At 8 bits a bf16 bias is off by
            # up to half a quantization step (2^-8 of the range), so 8-bit affine layers keep float32
            # scales and biases (0.5 more bit per weight); at 4 bits the step is 16x wider. The float
            # modes' scales are uint8 exponents, kept as they are.
            bits, mode = params["bits"], params.get("mode", "affine")
            quantized, *extras = mx.quantize(chunk.astype(mx.float32), group_size=params["group_size"], bits=bits, mode=mode)
            if mode == "affine":
                scale_dtype = mx.float32 if bits == 8 else dtype
                piece = {"weight": quantized, "scales": extras[0].astype(scale_dtype), "biases": extras[1].astype(scale_dtype)}
            else:
                piece = {"weight": quantized, "scales": extras[0]}
        else:
            floating = dtype is not None and mx.issubdtype(chunk.dtype, mx.floating)
            piece = {"weight": chunk.astype(dtype) if floating else chunk}
        mx.eval(piece)
        pieces.append(piece)
    return {kind: mx.concatenate([p[kind] for p in pieces]) if len(pieces) > 1 else pieces[0][kind] for kind in pieces[0]}


def source_locations(files: list[Path], config: ModelConfig) -> dict[str, TensorLocation]:
    """Where each tensor we use lies, by our name, in file order."""
    locations = {}
    for file in files:
        data_start, header = read_header(file)
        for stored_name in header:
            name = our_name(stored_name, config)
            if name is None:
                continue
            location = locate(file, stored_name, data_start, header)
            if location is None:
                raise Gemma3nError(f"{file}: tensor {stored_name} has dtype {header[stored_name]['dtype']}, not a float or packed type")
            locations[name] = location
    return locations


def layout_fixes(locations: dict[str, TensorLocation], unpacked_shapes: dict) -> dict[str, tuple[int, ...]]:
    """The towers' tensors stored in MLX layout, with the transposes back to PyTorch's (a packed
    convolution by the shape it is written in once dequantized)."""
    fixes = {}
    for tower in TOWERS:
        shapes = {n[len(tower) + 1 :]: unpacked_shapes.get(n, loc.shape) for n, loc in locations.items() if n.startswith(f"{tower}.")}
        if shapes:
            fixes.update({f"{tower}.{n}": axes for n, axes in torch_layout_fixes(tower, shapes).items()})
    return fixes


def towers_in_torch_layout(locations: dict[str, TensorLocation]) -> bool:
    """Whether the source stores the vision tower's convolutions in PyTorch's layout (a Transformers
    checkpoint, or our folders, which keep it)."""
    prefix = "vision_tower."
    shapes = {n[len(prefix) :]: loc.shape for n, loc in locations.items() if n.startswith(prefix) and len(loc.shape) == 4}
    return bool(stored_in_torch_layout("vision_tower", shapes))


def conv_shape(mlx_shape: tuple, torch_layout: bool) -> tuple:
    """A convolution weight's shape (O, kH, kW, I) in MLX layout, or (O, I, kH, kW) in PyTorch's."""
    out_ch, height, width, in_ch = mlx_shape
    return (out_ch, in_ch, height, width) if torch_layout else mlx_shape


def write_weights(files: list[Path], config: ModelConfig, plan: WeightPlan, writer: ShardWriter, quiet: bool = False) -> None:
    """Tensor by tensor, read straight from the files: rename, dequantize, fuse, cast, quantize,
    hand to the writer (`quiet`: without the progress bar)."""
    locations = source_locations(files, config)
    if plan.matformer:
        locations = plan.matformer.apply(locations, lambda name, location, cut: CutLocation(location, cut))
    torch_towers = towers_in_torch_layout(locations)
    unpacked_shapes = {  # packed pointwise convolutions, once dequantized
        name: conv_shape(plan.conv_shapes[name], torch_towers) for name in locations
        if name in plan.conv_shapes and name.rpartition(".")[0] in plan.packed
    }
    fixes = layout_fixes(locations, unpacked_shapes) if plan.hf_format else {}
    for name, location in with_progress(locations, quiet):
        module_path, _, kind = name.rpartition(".")
        source, lora, params = plan.packed.get(module_path), plan.loras.get(module_path), plan.quantize.get(module_path)
        if source and params == source and lora is None:  # stays packed as it is
            outputs = converted(location, None, None)
        elif source and kind != "weight":
            continue  # scales and biases: dequantized with their weight
        elif name in plan.tuned:
            outputs = {"weight": plan.tuned[name].astype(plan.dtype)}
        else:
            packed = Packed(locations[f"{module_path}.scales"], locations.get(f"{module_path}.biases"), **source) if source else None
            outputs = converted(location, params if kind == "weight" else None, plan.dtype, packed, lora if kind == "weight" else None)
            if packed and not params and name in unpacked_shapes:
                outputs["weight"] = outputs["weight"].reshape(unpacked_shapes[name])
        main = outputs.pop("weight")
        writer.add(plan.output_name(name), main.transpose(fixes[name]) if name in fixes else main)
        for extra, tensor in outputs.items():
            writer.add(plan.output_name(f"{module_path}.{extra}"), tensor)
    writer.close()
