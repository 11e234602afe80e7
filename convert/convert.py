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
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gemma3n.config import ModelConfig, read_config
from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.loader import COMPUTE_DTYPES, check_names, our_name, resolve_model_path, safetensors_names, weight_files
from mlx_gemma3n.mapped import SAFETENSORS_DTYPES, TensorLocation, locate, read_header
from mlx_gemma3n.model import TOWERS, Model
from mlx_gemma3n.quantization import RECIPES, config_block, quantization_plan

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
        how += f" -q --quant-recipe {block['recipe']} --q-group-size {block['group_size']}"
        weights = f"quantized ({block['recipe']}: affine, group size {block['group_size']}), float parts in {dtype}"
    else:
        weights = dtype
    return (
        f"---\nlibrary_name: mlx\nbase_model: {src}\ntags: [mlx, gemma3n]\n---\n\n"
        f"# {dst.name}\n\nConverted from [{src}](https://huggingface.co/{src}) for "
        f"[mlx-gemma3n](https://github.com/) with:\n\n```bash\n{how}\n```\n\nWeights: {weights}.\n\n"
        "```python\nfrom mlx_gemma3n import load\nfrom mlx_gemma3n.generate import generate\n\n"
        f'model, processor = load("{dst.name}")\nprint(generate(model, processor, "Hello!"))\n```\n'
    )


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quant_recipe: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert a Gemma 3n checkpoint (folder or hub id) into an MLX folder; returns its path."""
    if dtype not in COMPUTE_DTYPES:
        raise Gemma3nError(f"unknown dtype '{dtype}' (choose from {', '.join(COMPUTE_DTYPES)})")
    if quantize and q_bits not in (4, 8):
        raise Gemma3nError(f"--q-bits must be 4 or 8, got {q_bits}")
    if quantize and q_group_size not in (32, 64, 128):
        raise Gemma3nError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")
    recipe = quant_recipe or f"uniform{q_bits}"
    if quantize and recipe not in RECIPES:
        raise Gemma3nError(f"unknown quantization recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    dst = Path(mlx_path).expanduser().absolute()
    prepare_destination(dst, force)
    src = resolve_model_path(hf_path)
    raw_config = read_config(src)
    config = ModelConfig.from_dict(raw_config)
    files = weight_files(src)
    found = source_names(files, config)
    towers = tuple(t for t in TOWERS if any(name.startswith(f"{t}.") for name in found))
    skeleton = Model(config, towers=towers if config.is_multimodal else ())  # lazy: no weights allocated
    check_names(skeleton, found)

    block = None
    plan = {}
    if quantize:
        plan, left_float = quantization_plan(skeleton, recipe, q_group_size)
        for path in left_float:
            print(f"[convert] {path} stays float: its width does not divide by {q_group_size}", file=sys.stderr)
        block = config_block(plan, left_float, recipe, q_bits, q_group_size)

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_weights(files, config, plan, COMPUTE_DTYPES[dtype], ShardWriter(tmp, max_shard_bytes))
        out_config = dict(raw_config, dtype=dtype, torch_dtype=dtype)
        if block:
            out_config["quantization"] = block
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2))
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
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
    np_dtype, mx_dtype = SAFETENSORS_DTYPES[location.dtype]
    row = int(np.prod(location.shape[1:], dtype=np.int64))
    offset = location.offset + start * row * np.dtype(np_dtype).itemsize
    values = np.fromfile(location.file, dtype=np_dtype, count=(stop - start) * row, offset=offset)
    return mx.array(values).view(mx_dtype).reshape(stop - start, *location.shape[1:])


def converted(location: TensorLocation, params: dict | None, dtype) -> dict[str, mx.array]:
    """One tensor cast (or quantized when `params`), in row chunks of ~CHUNK_BYTES, each evaluated
    before the next is read: peak memory is one chunk plus the output, whatever the tensor's size."""
    if not location.shape:  # a scalar is one row of one value
        location = TensorLocation(location.file, location.dtype, (1,), location.offset)
        return {kind: t.reshape(()) for kind, t in converted(location, params, dtype).items()}
    rows = location.shape[0]
    row_bytes = max(1, int(np.prod(location.shape[1:], dtype=np.int64)) * 4)
    step = max(1, CHUNK_BYTES // row_bytes)
    pieces = []
    for start in range(0, rows, step):
        chunk = read_rows(location, start, min(rows, start + step))
        if params:
            # In float32: rounding to `dtype` first would round twice. At 8 bits a bf16 bias is off by
            # up to half a quantization step (2^-8 of the range), so 8-bit layers keep float32 scales
            # and biases (0.5 more bit per weight); at 4 bits the step is 16x wider.
            bits = params["bits"]
            packed, scales, biases = mx.quantize(chunk.astype(mx.float32), group_size=params["group_size"], bits=bits)
            scale_dtype = mx.float32 if bits == 8 else dtype
            piece = {"weight": packed, "scales": scales.astype(scale_dtype), "biases": biases.astype(scale_dtype)}
        else:
            piece = {"weight": chunk.astype(dtype) if mx.issubdtype(chunk.dtype, mx.floating) else chunk}
        mx.eval(piece)
        pieces.append(piece)
    return {kind: mx.concatenate([p[kind] for p in pieces]) if len(pieces) > 1 else pieces[0][kind] for kind in pieces[0]}


def write_weights(files: list[Path], config: ModelConfig, plan: dict, dtype, writer: ShardWriter) -> None:
    """Tensor by tensor, read straight from the files: rename, cast, quantize, hand to the writer."""
    for file in files:
        data_start, header = read_header(file)
        for hf_name in header:
            name = our_name(hf_name, config)
            if name is None:
                continue
            location = locate(file, hf_name, data_start, header)
            if location is None:
                raise Gemma3nError(f"{file}: tensor {hf_name} has dtype {header[hf_name]['dtype']}, not a float or packed type")
            module_path, _, kind = name.rpartition(".")
            params = plan.get(module_path) if kind == "weight" else None
            outputs = converted(location, params, dtype)
            writer.add(name, outputs.pop("weight"))
            for extra, tensor in outputs.items():
                writer.add(f"{module_path}.{extra}", tensor)
    writer.close()
