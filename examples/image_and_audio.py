"""One prompt with an image and a spoken question about it: Gemma 3n reads both at once.

    python examples/image_and_audio.py --model google/gemma-3n-E2B-it --image street.jpg --audio question.wav
"""

import argparse
import sys

from mlx_gemma3n import generate, load
from mlx_gemma3n.errors import run_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--image", required=True, help="image file or URL")
    parser.add_argument("--audio", required=True, help="audio file with a question about the image")
    parser.add_argument("--instruction", default="Answer the question in the audio about the image.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model, processor = load(args.model)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": args.image},
        {"type": "audio", "audio": args.audio},
        {"type": "text", "text": args.instruction},
    ]}]
    print(generate(model, processor, messages, max_tokens=args.max_tokens, temperature=0.0))


if __name__ == "__main__":
    sys.exit(run_command(main))
