"""Decode cost of a PEFT LoRA adapter run unfused, against the same adapter fused and no adapter.

    python -m benchmarks.adapter_cost --shape small --rank 16 --tokens 64 --runs 3 [--quantize]

Random weights of a Gemma 3n shape (`small`: the E2B layer structure and vocabularies at reduced
width; `e2b`: the real one), a random rank-r adapter on q/k/v/o and the MLP projections of every
layer (the usual fine-tuning recipe), written as PEFT writes it and loaded with `load_adapter`.
"Fused" adds each layer's scale * B A into its weight, which is what `mlx_gemma3n.fuse` writes; with
`--quantize` the base is int4 (the fused weights re-quantized) and the adapter runs over it unfused.
The three variants decode in turn, token by token through a KV cache after a 128-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma3n.adapters import LoRALinear
from mlx_gemma3n.adapters.modules import hf_module_name
from mlx_gemma3n.backends.cpu_split import split_over_cores

from .prefill_shortcut import build

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model, folder: Path, rank: int) -> None:
    tensors = {}
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in TARGETS and isinstance(module, nn.Linear):
            out_features, in_features = module.weight.shape
            key = f"base_model.model.{hf_module_name(path, 'model.language_model.')}"
            tensors[f"{key}.lora_A.weight"] = mx.random.normal((rank, in_features)) * 0.02
            tensors[f"{key}.lora_B.weight"] = mx.random.normal((out_features, rank)) * 0.02
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def fuse_in_place(model, quantize: bool) -> None:
    """Each LoRA layer's scale * B A added into its weight (re-quantized when the base is), then
    the adapter switched off: the fused model."""
    for _, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        base, delta = module.base, module.scale * (module.lora_b @ module.lora_a).astype(mx.float32)
        if quantize:
            weight = mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size, bits=base.bits)
            base.weight, base.scales, base.biases = mx.quantize(weight + delta, group_size=base.group_size, bits=base.bits)
        else:
            base.weight = (base.weight + delta).astype(base.weight.dtype)
    model.set_adapter(None)


def decode_tps(model, prompt: mx.array, tokens: int) -> float:
    cache = model.make_cache()
    logits = model(prompt, cache=cache, last_token_only=True)
    token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["small", "e2b"], default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quantize", action="store_true", help="int4 base (group size 64)")
    args = parser.parse_args()
    model = build(args.shape, mx.bfloat16)
    folder = tempfile.TemporaryDirectory()
    write_adapter(model, Path(folder.name), args.rank)
    if args.quantize:
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and ".altup." not in p and ".laurel." not in p)
        model.activation_dtype = mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None
    if mx.default_device().type == mx.DeviceType.cpu:
        split_over_cores(model)
    prompt = mx.random.randint(0, 262144, (1, 128))
    model.load_adapter(folder.name, "bench")
    folder.cleanup()
    variants = {"none": lambda: model.set_adapter(None), "unfused": lambda: model.set_adapter("bench")}
    times = {name: [] for name in (*variants, "fused")}
    for _ in range(args.runs):
        for name, switch in variants.items():
            switch()
            times[name].append(decode_tps(model, prompt, args.tokens))
    model.set_adapter("bench")
    fuse_in_place(model, args.quantize)
    times["fused"] = [decode_tps(model, prompt, args.tokens) for _ in range(args.runs)]
    median = {name: statistics.median(v) for name, v in times.items()}
    base = "int4" if args.quantize else "bf16"
    print(f"shape={args.shape} base={base} rank={args.rank} tokens={args.tokens} runs={args.runs} device={mx.default_device()}")
    for name, tps in median.items():
        print(f"  {name:8s} {tps:7.2f} tok/s ({tps / median['none']:.2f}x no adapter)")
    print(f"  unfused / fused: {median['unfused'] / median['fused']:.2f}x")


if __name__ == "__main__":
    main()
