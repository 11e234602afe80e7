"""Ask a question about an image.

    python examples/image_qa.py --model google/gemma-3n-E2B-it --image cat.jpg --question "What is in this picture?"

The image can be a file or an http(s) URL.
"""

import argparse
import sys

from mlx_gemma3n import generate, load
from mlx_gemma3n.errors import run_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--image", required=True, help="image file or URL")
    parser.add_argument("--question", default="Describe this image in detail.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model, processor = load(args.model)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": args.image},
        {"type": "text", "text": args.question},
    ]}]
    print(generate(model, processor, messages, max_tokens=args.max_tokens, temperature=0.0))


if __name__ == "__main__":
    sys.exit(run_command(main))
