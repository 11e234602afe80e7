"""Quantized towers (`convert -q --quantize-towers BITS`): tower output error and greedy agreement of
image and audio prompts, per decoder recipe and tower bits, against the same folder with float towers.

    python benchmarks/tower_quality.py [--tokens 16] [--shape tiny|small-mm] [--recipes uniform4,mixed3]

The test suite's tiny multimodal checkpoint (tests/reference.py, Transformers, MobileNet v5 at channel
multiplier 0.05, a one-block conformer) converted at group size 32, float parts bf16. Each decoder recipe is
converted with float towers and with the towers at each of TOWER_BITS, so the decoder is the same
and only the towers differ: relative error (L2) of the vision tower's soft tokens on a random 768 x 768 image and of the
audio tower's output on a 2 s clip; greedy agreement (matching prefix of --tokens greedy tokens, as
a fraction) of an image prompt and an audio prompt; and the mean KL of the next-token distributions
over the float-tower run's greedy reply, teacher-forced. `--shape small-mm`: the harness's media
checkpoint instead (`small` text, the real vision tower, 2 conformer layers; random weights) at group
size 64, with its 640 x 480 image and 10 s clip. The tiny towers' widths (8-32 channels) leave many
pointwise convolutions float (their input width must divide by 32); the share quantized is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests"), str(Path(__file__).resolve().parent.parent)]
import conftest  # noqa: E402,F401  (torchvision op schemas for Transformers' Gemma 3n)
from reference import TINY_TEXT_A, build_checkpoint  # noqa: E402

from mlx_gemma3n import load  # noqa: E402
from mlx_gemma3n.convert import convert  # noqa: E402
from mlx_gemma3n.generate import stream_generate  # noqa: E402
from mlx_gemma3n.inputs.audio_files import load_audio  # noqa: E402
from mlx_gemma3n.weights.quantization import TOWER_PREFIXES, is_quantizable  # noqa: E402

GROUP_SIZE = 32
DECODER_RECIPES = ("uniform4", "mixed3")
TOWER_BITS = (4, 8)


def relative_error(reference: mx.array, other: mx.array) -> float:
    reference, other = reference.astype(mx.float32), other.astype(mx.float32)
    return (mx.linalg.norm(reference - other) / mx.linalg.norm(reference)).item()


def describe(part: dict) -> list[dict]:
    """The one-turn chat every measurement prompts with: the medium, then "Describe it."."""
    return [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]


def greedy(model, processor, part: dict, tokens: int) -> list[int]:
    return [r.token for r in stream_generate(model, processor, describe(part), tokens, temperature=0.0)]


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


def checkpoint(shape: str, tmp: Path) -> tuple[Path, dict, int]:
    """(source folder, media files, group size) of a shape: the test suite's tiny checkpoint, or the
    harness's `small-mm` (benchmarks/checkpoints.py) at its group size."""
    if shape == "tiny":
        build_checkpoint(tmp / "a", text=TINY_TEXT_A, seed=0)
        return tmp / "a", media(tmp), 32
    from benchmarks.checkpoints import ensure_checkpoint, ensure_media

    return ensure_checkpoint(shape), ensure_media(), 64


def reply_kl(reference_model, model, processor, part: dict, reply: list[int]) -> float:
    """Mean KL(reference || model) of the next-token distributions over the reference's greedy reply,
    teacher-forced: same prompt, same media, same tokens; only the towers differ."""
    prompt = processor.prepare(describe(part))
    ids = mx.array([prompt.ids + reply[:-1]])

    def log_probs(m) -> mx.array:
        hidden = m.hidden_states(ids, embeddings=m.embed_with_media(ids, prompt.images, prompt.audio))
        logits = m.logits(hidden[:, len(prompt.ids) - 1 :]).astype(mx.float32)[0]
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    p, q = log_probs(reference_model), log_probs(model)
    return mx.mean(mx.sum(mx.exp(p) * (p - q), axis=-1)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--shape", choices=("tiny", "small-mm"), default="tiny")
    parser.add_argument("--recipes", default=",".join(DECODER_RECIPES), help="decoder recipes, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, files, group_size = checkpoint(args.shape, tmp)
        print(f"{args.shape} multimodal checkpoint, group size {group_size}, float parts bf16; {args.tokens} greedy tokens")
        print("| decoder recipe | tower bits | tower modules quantized | vision rel. error | audio rel. error "
              "| image prompt agreement | audio prompt agreement | image reply KL | audio reply KL |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        parts = ({"type": "image", "image": str(files["image"])}, {"type": "audio", "audio": str(files["audio"])})
        for recipe in args.recipes.split(","):
            def convert_at(name: str, bits: int | None, recipe=recipe):
                return load(convert(str(source), tmp / name, quantize=True, quant_recipe=recipe,
                                    q_group_size=group_size, q_tower_bits=bits))

            float_towers, processor = convert_at(f"{recipe}-float", None)
            pixels = mx.array(processor.image_pixels(str(files["image"])))[None]
            features, valid = processor.audio_features(load_audio(files["audio"]))
            features, valid = mx.array(features)[None], mx.array(valid)[None]
            replies = [greedy(float_towers, processor, part, args.tokens) for part in parts]
            for bits in TOWER_BITS:
                packed_towers, _ = convert_at(f"{recipe}-{bits}", bits)
                vision = relative_error(float_towers.vision_tower(pixels), packed_towers.vision_tower(pixels))
                audio = relative_error(float_towers.audio_tower(features, valid)[0], packed_towers.audio_tower(features, valid)[0])
                agree = [agreement(reply, greedy(packed_towers, processor, part, args.tokens)) for reply, part in zip(replies, parts)]
                kl = [reply_kl(float_towers, packed_towers, processor, part, reply) for reply, part in zip(replies, parts)]
                print(f"| {recipe} | {bits} | {quantized_share(packed_towers)} | {vision:.4f} | {audio:.4f} "
                      f"| {agree[0]:.2f} | {agree[1]:.2f} | {kl[0]:.4f} | {kl[1]:.4f} |", flush=True)
                shutil.rmtree(tmp / f"{recipe}-{bits}")

if __name__ == "__main__":
    main()
