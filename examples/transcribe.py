"""Transcribe speech (WAV, FLAC, MP3, OGG; any sample rate; over 30 s it is cut into clips), streaming the text.

    python examples/transcribe.py --model google/gemma-3n-E2B-it --audio speech.wav
"""

import argparse
import sys

from mlx_gemma3n import load, stream_generate
from mlx_gemma3n.errors import run_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--audio", required=True, help="audio file")
    parser.add_argument("--instruction", default="Transcribe this audio clip into text.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model, processor = load(args.model)
    messages = [{"role": "user", "content": [
        {"type": "audio", "audio": args.audio},
        {"type": "text", "text": args.instruction},
    ]}]
    for response in stream_generate(model, processor, messages, max_tokens=args.max_tokens, temperature=0.0):
        print(response.text, end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(run_command(main))
