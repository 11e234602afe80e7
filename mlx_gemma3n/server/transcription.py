"""OpenAI's audio API: POST /v1/audio/transcriptions and /v1/audio/translations, multipart forms as
OpenAI defines them, answered by transcribe/'s Transcriber on the server's engine (the clips of an
upload decode in the running batch beside chat requests). Greedy by default, as the CLI is."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import Gemma3nError
from ..inputs.audio_files import SoundTooLong, audio_duration, read_audio_blocks
from ..transcribe.formats import Segment, render, transcript_text
from ..transcribe.prompts import language_name
from ..transcribe.transcriber import Task, Transcriber
from .engine import Engine
from .errors import ApiError, bad_request
from .requests import RequestContext, resolve_model
from .responses import sse

UPLOAD_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMED_FORMATS = ("json", "text")
TRANSLATION_FIELDS = {"file", "model", "prompt", "response_format", "temperature"}
TRANSCRIPTION_FIELDS = TRANSLATION_FIELDS | {"language", "timestamp_granularities[]", "stream"}
TRANSLATION_TARGET = "en"  # OpenAI's translations endpoint translates into English
DISCONNECT_POLL_SECONDS = 0.5
CODEC_PADDING_SECONDS = 1.0  # how far decoded sound may run past its header's length (encoder delay, padding)


@dataclass
class AudioRequest:
    upload: UploadFile
    duration: float  # seconds
    task: Task
    adapter: str | None
    response_format: str
    stream: bool
    translate: bool


def single_value(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise bad_request(f"'{name}' is given {len(values)} times", name)
    if values and not isinstance(values[0], str):
        raise bad_request(f"'{name}' must be a form field, not a file", name)
    return values[0] if values else None


def form_temperature(form: FormData) -> float:
    value = single_value(form, "temperature")
    if value is None:
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        raise bad_request(f"'temperature' must be a number, got '{value}'", "temperature") from None
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"'temperature' must be in [0, 2], got {value}", "temperature")
    return temperature


def form_stream(form: FormData) -> bool:
    value = single_value(form, "stream")
    if value is None or value.lower() in ("false", "0"):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise bad_request(f"'stream' must be true or false, got '{value}'", "stream")


def check_granularities(form: FormData) -> None:
    for value in form.getlist("timestamp_granularities[]"):
        if value == "word":
            raise bad_request("word timestamps are not available: Gemma 3n gives the text of each clip of up to 30 s, "
                              "so segments (a clip each) are the finest timing", "timestamp_granularities[]")
        if value != "segment":
            raise bad_request(f"'timestamp_granularities[]' takes 'segment', got '{value}'", "timestamp_granularities[]")


def parse_audio_form(form: FormData, context: RequestContext, translate: bool) -> AudioRequest:
    """The form of an audio request, every field checked (a 400 naming it), the file's length
    read from its header (413 over the server's --max-audio-seconds)."""
    allowed = TRANSLATION_FIELDS if translate else TRANSCRIPTION_FIELDS
    for name in form.keys():
        if name not in allowed:
            raise bad_request(f"'{name}' is not supported by this endpoint", name)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request("'file' must be an uploaded audio file", "file")
    adapter = resolve_model({"model": single_value(form, "model")}, context)
    response_format = single_value(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                          "response_format")
    stream = form_stream(form)
    if stream and response_format not in STREAMED_FORMATS:
        raise bad_request(f"'stream' works with response_format json or text, not {response_format}", "stream")
    check_granularities(form)
    task = Task(language=single_value(form, "language") or None,
                translate_to=TRANSLATION_TARGET if translate else None,
                temperature=form_temperature(form), context=single_value(form, "prompt") or None)
    try:
        duration = audio_duration(upload.file, "file")
    except Gemma3nError as exc:
        raise bad_request(str(exc), "file") from None
    if duration > context.limits.max_audio_seconds:
        raise ApiError(413, f"the recording is {duration:.1f} s; this server takes at most "
                            f"{context.limits.max_audio_seconds:g} s (its --max-audio-seconds)", "file")
    return AudioRequest(upload, duration, task, adapter, response_format, stream, translate)


def upload_blocks(audio: AudioRequest, sampling_rate: int, limit: float):
    """The upload's samples in blocks, decoding stopped past `limit` (the header said less, and a file
    can lie); the file is closed once read (or when reading stops)."""
    try:
        yield from read_audio_blocks(audio.upload.file, "file", sampling_rate, max_seconds=limit + CODEC_PADDING_SECONDS)
    except SoundTooLong:
        raise SoundTooLong(f"the recording runs past {limit:g} s, this server's --max-audio-seconds") from None
    finally:
        audio.upload.file.close()


def upload_error(error: Gemma3nError) -> ApiError:
    return ApiError(413 if isinstance(error, SoundTooLong) else 400, str(error), "file")


def collected(segments) -> list[Segment]:
    try:
        return list(segments)
    except Gemma3nError as exc:
        raise upload_error(exc) from None


def verbose(audio: AudioRequest, segments: list[Segment]) -> dict:
    """OpenAI's verbose_json: the text with its segments (each a clip, `seek` its start in 10 ms)."""
    language = language_name(TRANSLATION_TARGET if audio.translate else audio.task.language)
    return {
        "task": "translate" if audio.translate else "transcribe",
        "language": language.lower() if language else None,
        "duration": round(audio.duration, 3),
        "text": transcript_text(segments),
        "segments": [{"id": i, "seek": round(s.start * 100), "start": s.start, "end": s.end, "text": s.text,
                      "temperature": audio.task.temperature} for i, s in enumerate(segments)],
        "usage": usage(audio),
    }


def usage(audio: AudioRequest) -> dict:
    return {"type": "duration", "seconds": math.ceil(audio.duration)}


def whole_response(audio: AudioRequest, segments: list[Segment]):
    if audio.response_format == "json":
        return JSONResponse({"text": transcript_text(segments), "usage": usage(audio)})
    if audio.response_format == "verbose_json":
        return JSONResponse(verbose(audio, segments))
    if audio.response_format == "text":
        return PlainTextResponse(transcript_text(segments) + "\n")
    return PlainTextResponse(render(segments, audio.response_format), media_type="text/plain")


class AudioApi:
    def __init__(self, engine: Engine, context: RequestContext):
        self.engine, self.context = engine, context

    async def transcriptions(self, request: Request):
        return await self.answer(request, translate=False)

    async def translations(self, request: Request):
        return await self.answer(request, translate=True)

    async def answer(self, request: Request, translate: bool):
        form = await request.form(max_files=1, max_fields=len(TRANSCRIPTION_FIELDS) + 4)
        try:
            audio = await run_in_threadpool(parse_audio_form, form, self.context, translate)
        except BaseException:
            await form.close()
            raise
        transcriber = Transcriber(self.engine, self.context.processor, audio.task, audio.adapter)
        stop = threading.Event()
        segments = transcriber.segments(upload_blocks(audio, transcriber.rate, self.context.limits.max_audio_seconds), stop)
        if audio.stream:
            return StreamingResponse(self.events(segments, stop), media_type="text/event-stream")
        try:
            return whole_response(audio, await self.until_done(request, segments))
        finally:
            stop.set()

    @staticmethod
    async def until_done(request: Request, segments) -> list[Segment]:
        """All segments, transcribed in a worker thread; a client that goes away stops the work."""
        work = asyncio.ensure_future(run_in_threadpool(collected, segments))
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_SECONDS)
            if not work.done() and await request.is_disconnected():
                raise ApiError(499, "the client went away")
        return work.result()

    @staticmethod
    async def events(segments, stop: threading.Event):
        """OpenAI's transcript.text.delta events, a segment's text each, then transcript.text.done."""
        texts = []
        try:
            async for segment in iterate_in_threadpool(segments):
                texts.append(segment.text)
                yield sse({"type": "transcript.text.delta", "delta": segment.text if len(texts) == 1 else " " + segment.text})
            yield sse({"type": "transcript.text.done", "text": " ".join(texts)})
        except Gemma3nError as exc:
            yield sse(upload_error(exc).body())
        finally:
            stop.set()
