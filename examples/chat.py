"""A chat loop in the terminal: each turn feeds only the new text, the KV cache is kept across turns.

    python examples/chat.py --model google/gemma-3n-E2B-it [--system "You are brief."]

Type a message and press Enter; an empty line or Ctrl-D ends the chat.
"""

import argparse
import sys

from mlx_gemma3n import load
from mlx_gemma3n.errors import run_command
from mlx_gemma3n.generate import ChatSession, sampling_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temp", type=float, help="sampling temperature (0 = greedy; default: the model's)")
    args = parser.parse_args()

    model, processor = load(args.model)
    chat = ChatSession(model, processor, system=args.system)
    params = sampling_params(processor, temperature=args.temp)  # defaults: the model's generation_config.json
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        for response in chat.ask(line.strip(), params, max_tokens=args.max_tokens):
            print(response.text, end="", flush=True)
        print()


if __name__ == "__main__":
    sys.exit(run_command(main))
