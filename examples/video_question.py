"""Ask a question about a video: Gemma 3n sees its frames, each after its time, and hears its sound.

    pip install 'mlx-gemma3n[video]'
    python examples/video_question.py --model google/gemma-3n-E2B-it --video clip.mp4 --question "What happens?"

Frames are sampled at up to --fps a second, at most --max-frames of them over the whole video; what the
model is shown is printed on stderr.
"""

import argparse
import sys

from mlx_gemma3n import generate, load
from mlx_gemma3n.errors import run_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--video", required=True, help="video file: MP4, WebM, MOV...")
    parser.add_argument("--question", default="Describe what happens in this video.")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second, at most")
    parser.add_argument("--max-frames", type=int, default=8, help="frames sampled, at most")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model, processor = load(args.model)
    parts = processor.video_parts(args.video, fps=args.fps, max_frames=args.max_frames)
    shown = [part["text"].rstrip(":") for part in parts if part["type"] == "text"]
    sound = " and its sound" if any(part["type"] == "audio" for part in parts) else ""
    print(f"shown: {', '.join(shown)}{sound}", file=sys.stderr)
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": args.question}]}]
    print(generate(model, processor, messages, max_tokens=args.max_tokens, temperature=0.0))


if __name__ == "__main__":
    sys.exit(run_command(main))
