"""`python -m mlx_gemma3n.transcribe FILE... --model M`: transcripts (or translations) of recordings of
any length, written to `<output-dir>/<name>.<format>` and printed as their segments finish."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..command import command_parser
from ..errors import Gemma3nError, run_command
from ..inputs.audio_files import audio_duration, audio_file
from .formats import FORMATS, Segment, render
from .transcriber import DEFAULT_MAX_TOKENS, Task, Transcriber, open_transcriber

DEFAULT_MODEL = "google/gemma-3n-E2B-it"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("mlx_gemma3n.transcribe", description=__doc__)
    parser.add_argument("files", nargs="+", metavar="FILE", help="recordings: WAV, FLAC, MP3, OGG... of any length")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hugging Face hub id")
    parser.add_argument("--format", default="txt", help=f"what to write: {', '.join(FORMATS)} (default txt)")
    parser.add_argument("--language", help="the spoken language (ISO 639-1 code or name; default: the model tells)")
    parser.add_argument("--translate-to", metavar="LANGUAGE", help="write a translation into this language instead")
    parser.add_argument("--prompt", help="words the speech may hold (names, terms), given to the model with each clip")
    parser.add_argument("--output-dir", default=".", help="where transcripts are written (default: here)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, the same transcript each run")
    parser.add_argument("--batch-size", type=int, default=4, help="clips transcribed together (default 4)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens of text per 30 s clip at most")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no segments on the terminal")
    return parser.parse_args(argv)


def checked(args: argparse.Namespace) -> list[Path]:
    """The input files, after every argument is checked: a mistake is found before the model loads."""
    if args.format not in FORMATS:
        raise Gemma3nError(f"unknown --format '{args.format}' (one of {', '.join(FORMATS)})")
    if args.temperature < 0:
        raise Gemma3nError("--temperature must be 0 or more")
    if args.batch_size < 1 or args.max_tokens < 1:
        raise Gemma3nError("--batch-size and --max-tokens must be at least 1")
    files = [audio_file(name) for name in args.files]
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise Gemma3nError(f"--output-dir {args.output_dir} is not a folder")
    return files


def write_atomically(path: Path, text: str) -> None:
    """Written whole or not at all: a temporary file beside it, renamed at the end."""
    partial = path.with_name(f".{path.name}.part")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class Progress:
    """Audio seconds done of the file, with the speed as a real-time factor (audio s per wall s); on
    a terminal only, as convert's bar."""

    def __init__(self, path: Path, seconds: float, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=round(seconds, 1), unit="s", desc=path.name, disable=quiet or not sys.stderr.isatty(), file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]")
        self.started = time.perf_counter()

    def advance(self, segment_end: float) -> None:
        self.bar.update(round(segment_end, 1) - self.bar.n)
        self.bar.set_postfix_str(f"{segment_end / max(time.perf_counter() - self.started, 1e-9):.1f}x real time")

    def close(self) -> None:
        self.bar.close()


def transcribe_file(transcriber: Transcriber, path: Path, args: argparse.Namespace) -> Path:
    progress = Progress(path, audio_duration(str(path), f"audio file {path}"), args.quiet)
    segments: list[Segment] = []
    try:
        for segment in transcriber.transcribe(path):
            segments.append(segment)
            progress.advance(segment.end)
            if not args.quiet:
                progress.bar.write(f"[{segment.start:8.2f} -> {segment.end:8.2f}] {segment.text}", file=sys.stdout)
        progress.advance(progress.bar.total)
    finally:
        progress.close()
    output = Path(args.output_dir) / f"{path.stem}.{args.format}"
    write_atomically(output, render(segments, args.format, args.translate_to or args.language))
    return output


def transcribe_from_args(args: argparse.Namespace) -> None:
    files = checked(args)
    task = Task(args.language, args.translate_to, args.temperature, args.prompt, args.max_tokens)
    with open_transcriber(args.model, task, args.batch_size, args.dtype) as transcriber:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        for path in files:
            output = transcribe_file(transcriber, path, args)
            print(f"wrote {output}", file=sys.stderr)


def main(argv=None) -> int:
    return run_command(lambda: transcribe_from_args(parse_args(argv)))
