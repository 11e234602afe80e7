"""Quantization quality against float32: top-1 agreement and mean KL(float || quantized).

    python benchmarks/quant_quality.py

Builds the test suite's tiny random Gemma 3n checkpoints (tests/reference.py, Transformers), and for
each checkpoint measures (1) each recipe of mlx_gemma3n.weights.quantization.RECIPES through the real
conversion (`convert`), with bf16 and float32 float parts, and the recipes in MLX's float modes
(mxfp4, nvfp4, mxfp8), (2) the mixed candidates the kept one was chosen from and (3) sensitivity:
one group of modules at 4 and at 3 bits, everything else float, to see which group costs the most.
Positions: 4 prompts x 80 tokens = 320 per checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import conftest  # noqa: E402,F401  (torchvision op schemas for Transformers' Gemma 3n)
from reference import TINY_TEXT_A, TINY_TEXT_B, build_checkpoint  # noqa: E402

from mlx_gemma3n import load  # noqa: E402
from mlx_gemma3n.convert import convert  # noqa: E402
from mlx_gemma3n.weights.quantization import RECIPES, is_quantizable  # noqa: E402

GROUP_SIZE = 32
MODE_ROWS = (("uniform4", "mxfp4"), ("uniform4", "nvfp4"), ("uniform8", "mxfp8"), ("mixed", "mxfp4"))
# Mixed recipes considered besides the one kept in RECIPES ("mixed": LM head + attention at 8).
CANDIDATES = {
    "candidate: LM head at 8": lambda p: 8 if p.endswith("embed_tokens") else 4,
    "candidate: LM head + MLP at 8": lambda p: 8 if p.endswith("embed_tokens") or ".mlp." in p else 4,
}
GROUPS = {
    "token embedding / LM head": ("embed_tokens",),
    "PLE table": ("embed_tokens_per_layer",),
    "attention": ("self_attn.",),
    "MLP": ("mlp.",),
    "AltUp + PLE projections": ("altup_projections", "altup_unembed", "per_layer_"),
}


def prompts(count: int = 4, length: int = 80) -> mx.array:
    ids = mx.random.randint(3, 512, (count, length), key=mx.random.key(0))
    return mx.concatenate([mx.full((count, 1), 2, dtype=ids.dtype), ids[:, 1:]], axis=1)


def compare(reference_logits: mx.array, logits: mx.array) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || quantized)) over all positions."""
    ref_logp = nn.log_softmax(reference_logits.astype(mx.float32), axis=-1)
    logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    kl = mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = mx.argmax(reference_logits, axis=-1) == mx.argmax(logits, axis=-1)
    return mx.mean(agree).item(), mx.mean(kl).item()


def quantized_copy(path: Path, bits_for_path) -> nn.Module:
    """The float32 model with the modules `bits_for_path` names (not None) quantized in memory. The
    PLE table, which load() serves from its file, is first read whole into an nn.Embedding, so that
    nn.quantize reaches it too."""
    model, _ = load(path)
    lm = model.language_model
    table = lm.embed_tokens_per_layer(mx.arange(model.config.text.vocab_size_per_layer_input))
    lm.embed_tokens_per_layer = nn.Embedding(*table.shape)
    lm.embed_tokens_per_layer.weight = table

    def predicate(module_path, module):
        if not is_quantizable(module_path, module) or module.weight.shape[-1] % GROUP_SIZE:
            return False
        bits = bits_for_path(module_path)
        return {"bits": bits, "group_size": GROUP_SIZE} if bits else False

    nn.quantize(model, class_predicate=predicate)
    return model


def measure(name: str, path: Path) -> list[tuple[str, str, float, float]]:
    model, _ = load(path)
    ids = prompts()
    reference = model(ids)
    rows = [(name, "bf16, not quantized", *compare(reference, load(path, dtype="bfloat16")[0](ids)))]
    for dtype in ("bfloat16", "float32"):
        for recipe in RECIPES:
            out = convert(str(path), path.parent / f"{path.name}-{recipe}-{dtype}", dtype=dtype, quantize=True,
                          quant_recipe=recipe, q_group_size=GROUP_SIZE)
            rows.append((name, f"convert {recipe}, float parts {dtype}", *compare(reference, load(out)[0](ids))))
    for recipe, mode in MODE_ROWS:
        out = convert(str(path), path.parent / f"{path.name}-{recipe}-{mode}", quantize=True, quant_recipe=recipe, q_mode=mode)
        rows.append((name, f"convert {recipe}, {mode}, float parts bfloat16", *compare(reference, load(out)[0](ids))))
    for label, bits_for_path in CANDIDATES.items():
        rows.append((name, label, *compare(reference, quantized_copy(path, bits_for_path)(ids))))
    for bits in (4, 3):
        for group, parts in GROUPS.items():
            def only_group(p, parts=parts, bits=bits):
                last = p.rsplit(".", 1)[-1]
                return bits if any(part in p if part.endswith(".") else last.startswith(part) for part in parts) else None

            quantized = quantized_copy(path, only_group)
            rows.append((name, f"only {group} at {bits}-bit", *compare(reference, quantized(ids))))
    return rows


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text, seed in (("tiny A", TINY_TEXT_A, 0), ("tiny B", TINY_TEXT_B, 1)):
            path = Path(tmp) / name.replace(" ", "_")
            build_checkpoint(path, text=text, seed=seed)
            rows += measure(name, path)
    print(f"group size {GROUP_SIZE}, 320 positions per checkpoint, float32 reference; candidates and")
    print("sensitivity rows quantize the float32 model in memory")
    print("| checkpoint | quantization | top-1 agreement | mean KL |")
    print("| --- | --- | --- | --- |")
    for name, label, agree, kl in rows:
        print(f"| {name} | {label} | {agree:.3f} | {kl:.5f} |")


if __name__ == "__main__":
    main()
