"""Quantized towers (`convert -q --quantize-towers`): tower output error and greedy agreement of image
and audio prompts, per recipe, against the same folder with float towers.

    python benchmarks/tower_quality.py [--tokens 16]

The test suite's tiny multimodal checkpoint (tests/reference.py, Transformers, MobileNet v5 at channel
multiplier 0.05, a one-block conformer) converted at group size 32, float parts bf16. Each recipe is
converted twice, towers float and towers quantized, so the decoder is the same and only the towers
differ: relative error (L2) of the vision tower's soft tokens on a random 768 x 768 image and of the
audio tower's output on a 2 s clip; greedy agreement (matching prefix of --tokens greedy tokens, as
a fraction) of an image prompt and an audio prompt. The tiny towers' widths (8-32 channels) leave many
pointwise convolutions float (their input width must divide by 32); the share quantized is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import conftest  # noqa: E402,F401  (torchvision op schemas for Transformers' Gemma 3n)
from reference import TINY_TEXT_A, build_checkpoint  # noqa: E402

from mlx_gemma3n import load  # noqa: E402
from mlx_gemma3n.audio_features import load_audio  # noqa: E402
from mlx_gemma3n.convert import convert  # noqa: E402
from mlx_gemma3n.generate import stream_generate  # noqa: E402
from mlx_gemma3n.quantization import TOWER_PREFIXES, is_quantizable  # noqa: E402

GROUP_SIZE = 32
RECIPES = ("uniform4", "uniform8", "mixed")


def relative_error(reference: mx.array, other: mx.array) -> float:
    reference, other = reference.astype(mx.float32), other.astype(mx.float32)
    return (mx.linalg.norm(reference - other) / mx.linalg.norm(reference)).item()


def greedy(model, processor, part: dict, tokens: int) -> list[int]:
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]
    return [r.token for r in stream_generate(model, processor, messages, tokens, temperature=0.0)]


def agreement(reference: list[int], other: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    return same / max(1, len(reference))


def quantized_share(model) -> str:
    """Tower modules packed / packed + those quantizable in kind left float (width not dividing)."""
    towers = [m for p, m in model.named_modules() if p.startswith(TOWER_PREFIXES)]
    packed = sum(isinstance(m, nn.QuantizedLinear) for m in towers)
    left = sum(is_quantizable(p, m, True) for p, m in model.named_modules() if p.startswith(TOWER_PREFIXES))
    return f"{packed}/{packed + left}"


def media(folder: Path) -> dict:
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    image, audio = folder / "image.png", folder / "clip.wav"
    Image.fromarray(rng.integers(0, 256, (420, 300, 3), dtype=np.uint8)).save(image)
    t = np.arange(32000) / 16000
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32), 16000)
    return {"image": image, "audio": audio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "a", text=TINY_TEXT_A, seed=0)
        files = media(tmp)
        print(f"tiny multimodal checkpoint, group size {GROUP_SIZE}, float parts bf16; {args.tokens} greedy tokens")
        print("| recipe | tower modules quantized | vision rel. error | audio rel. error | image prompt agreement | audio prompt agreement |")
        print("| --- | --- | --- | --- | --- | --- |")
        for recipe in RECIPES:
            models = [load(convert(str(tmp / "a"), tmp / f"{recipe}-{towers}", quantize=True, quant_recipe=recipe,
                                   q_group_size=GROUP_SIZE, q_towers=towers)) for towers in (False, True)]
            (float_towers, processor), (packed_towers, _) = models
            pixels = mx.array(processor.image_pixels(str(files["image"])))[None]
            features, valid = processor.audio_features(load_audio(files["audio"]))
            features, valid = mx.array(features)[None], mx.array(valid)[None]
            vision = relative_error(float_towers.vision_tower(pixels), packed_towers.vision_tower(pixels))
            audio = relative_error(float_towers.audio_tower(features, valid)[0], packed_towers.audio_tower(features, valid)[0])
            image_prompt = {"type": "image", "image": str(files["image"])}
            audio_prompt = {"type": "audio", "audio": str(files["audio"])}
            agree = [agreement(greedy(float_towers, processor, part, args.tokens), greedy(packed_towers, processor, part, args.tokens))
                     for part in (image_prompt, audio_prompt)]
            print(f"| {recipe} | {quantized_share(packed_towers)} | {vision:.4f} | {audio:.4f} | {agree[0]:.2f} | {agree[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
