"""Transcripts as files: plain text, SubRip (srt), WebVTT (vtt) and JSON ({text, segments, language})."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

FORMATS = ("txt", "srt", "vtt", "json")


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str


def timestamp(seconds: float, decimal: str = ".") -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def transcript_text(segments: list[Segment]) -> str:
    return " ".join(segment.text for segment in segments)


def render(segments: list[Segment], form: str, language: str | None = None) -> str:
    if form == "txt":
        return "".join(f"{segment.text}\n" for segment in segments)
    if form == "srt":
        return "".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text}\n\n" for i, s in enumerate(segments, 1))
    if form == "vtt":
        return "WEBVTT\n\n" + "".join(f"{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text}\n\n" for s in segments)
    if form == "json":
        body = {"text": transcript_text(segments), "segments": [asdict(s) for s in segments], "language": language}
        return json.dumps(body, ensure_ascii=False, indent=2) + "\n"
    raise ValueError(f"unknown transcript format '{form}' (one of {', '.join(FORMATS)})")
