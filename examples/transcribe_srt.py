"""Subtitles for a recording of any length: transcribe it clip by clip (each cut in a pause) and write
SubRip cues beside it (meeting.mp3 -> meeting.srt).

    python examples/transcribe_srt.py --model google/gemma-3n-E2B-it meeting.mp3 [--language en]
"""

import argparse
import sys
from pathlib import Path

from mlx_gemma3n.errors import run_command
from mlx_gemma3n.transcribe import Task, open_transcriber, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", help="a recording: WAV, FLAC, MP3, OGG...")
    parser.add_argument("--model", default="google/gemma-3n-E2B-it", help="model folder or Hugging Face hub id")
    parser.add_argument("--language", help="the spoken language (default: the model tells)")
    args = parser.parse_args()

    with open_transcriber(args.model, Task(language=args.language)) as transcriber:
        segments = []
        for segment in transcriber.transcribe(args.audio):  # in order, as each clip is done
            print(f"{segment.start:7.1f}s  {segment.text}", file=sys.stderr)
            segments.append(segment)
    subtitles = Path(args.audio).with_suffix(".srt")
    subtitles.write_text(render(segments, "srt"), encoding="utf-8")
    print(subtitles)


if __name__ == "__main__":
    sys.exit(run_command(main))
