"""Transcription and translation of recordings of any length: `python -m mlx_gemma3n.transcribe FILE
--model M`, and the server's /v1/audio endpoints.

prompts.py holds what each clip is asked (the prompts of Google's Gemma audio guide), transcriber.py
turns a recording's blocks into timed segments through the batching engine, formats.py writes them as
txt, srt, vtt or json, cli.py is the command line.
"""

from .formats import FORMATS, Segment, render
from .transcriber import Task, Transcriber, open_transcriber

__all__ = ["FORMATS", "Segment", "Task", "Transcriber", "open_transcriber", "render"]
