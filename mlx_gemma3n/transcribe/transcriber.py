"""A recording to timed segments of text: its blocks are cut into clips as they arrive
(inputs/audio_split.py), each clip becomes one request to the batching engine (server/engine.py), and
up to `max_batch` clips decode together, each on its own cache, so a clip's text is the one it gets
alone. Segments come out in order as they finish; silent clips give none."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..decoding.sampling import SamplingParams
from ..errors import Gemma3nError
from ..inputs.audio_files import audio_file, read_audio_blocks
from ..inputs.audio_split import ClipSplitter, is_silent
from ..server.engine import Engine, Job
from ..server.requests import GenerationRequest, media_digests
from .formats import Segment
from .prompts import answer_text, instruction

DEFAULT_MAX_TOKENS = 256  # a 30 s clip of fast speech is about 100 words
POLL_SECONDS = 0.25  # how often a wait for a clip's text looks at the stop event


@dataclass
class Task:
    """What is asked of each clip."""

    language: str | None = None
    translate_to: str | None = None
    temperature: float = 0.0  # greedy: a transcript is reproducible
    context: str | None = None  # words the speech may hold
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass
class ClipJob:
    start: int
    end: int
    job: Job | None  # None: a silent clip
    deltas: queue.Queue


class Transcriber:
    """`adapter`: the name of a loaded adapter to transcribe with (None: the base model)."""

    def __init__(self, engine, processor, task: Task = Task(), adapter: str | None = None):
        self.engine, self.processor, self.task, self.adapter = engine, processor, task, adapter
        self.rate = processor.audio_settings.sampling_rate
        self.text = instruction(task.language, task.translate_to, task.context)

    def request(self, samples: np.ndarray) -> GenerationRequest:
        messages = [{"role": "user", "content": [{"type": "audio", "audio": samples}, {"type": "text", "text": self.text}]}]
        prompt = self.processor.prepare(messages)
        return GenerationRequest(prompt, media_digests(prompt), self.task.max_tokens,
                                 SamplingParams(temperature=self.task.temperature), adapter=self.adapter)

    def submit(self, start: int, end: int, samples: np.ndarray) -> ClipJob:
        deltas: queue.Queue = queue.Queue()
        if is_silent(samples):
            return ClipJob(start, end, None, deltas)
        job = Job(self.request(samples), deltas.put)
        self.engine.submit(job)
        return ClipJob(start, end, job, deltas)

    def finished(self, clip: ClipJob, stop: threading.Event) -> Segment | None:
        """The clip's segment once its text is complete (None: silent, or `stop` was set)."""
        if clip.job is None:
            return None
        parts = []
        while True:
            try:
                delta = clip.deltas.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if stop.is_set():
                    clip.job.cancelled = True
                    return None
                continue
            if delta.error is not None:
                raise Gemma3nError(f"transcribing {clip.start / self.rate:.2f}-{clip.end / self.rate:.2f} s failed: {delta.error}")
            parts.append(delta.text)
            if delta.finish_reason is not None:
                break
        text = answer_text("".join(parts), self.task.translate_to)
        return Segment(round(clip.start / self.rate, 3), round(clip.end / self.rate, 3), text) if text else None

    def segments(self, blocks: Iterable[np.ndarray], stop: threading.Event | None = None) -> Iterator[Segment]:
        """The segments of a recording given as consecutive blocks of samples at the model's rate;
        setting `stop` (from another thread) ends them early."""
        stop = stop or threading.Event()
        splitter = ClipSplitter(self.rate, self.processor.max_clip_samples)
        in_flight: deque[ClipJob] = deque()

        def clips():
            for block in blocks:
                yield from splitter.push(block)
            yield from splitter.finish()

        try:
            for start, end, samples in clips():
                if stop.is_set():
                    return
                in_flight.append(self.submit(start, end, samples))
                while len(in_flight) >= self.engine.max_batch:
                    if (segment := self.finished(in_flight.popleft(), stop)) is not None:
                        yield segment
            while in_flight and not stop.is_set():
                if (segment := self.finished(in_flight.popleft(), stop)) is not None:
                    yield segment
        finally:
            for clip in in_flight:  # the consumer stopped early, or a clip failed
                if clip.job is not None:
                    clip.job.cancelled = True

    def transcribe(self, path: str | Path, stop: threading.Event | None = None) -> Iterator[Segment]:
        """The segments of an audio file of any length, read in blocks."""
        path = audio_file(path)
        return self.segments(read_audio_blocks(str(path), f"audio file {path}", self.rate), stop)


@contextlib.contextmanager
def open_transcriber(model: str | Path, task: Task = Task(), batch_size: int = 4, dtype=None) -> Iterator[Transcriber]:
    """A Transcriber over a model folder or hub id, its clips decoded `batch_size` at a time:

        with open_transcriber("google/gemma-3n-E2B-it") as transcriber:
            for segment in transcriber.transcribe("meeting.mp3"):
                print(segment.start, segment.end, segment.text)
    """
    from ..inputs.processor import Processor
    from ..weights.files import resolve_model_path
    from ..weights.loader import load_model

    model_dir = resolve_model_path(model)
    processor = Processor(model_dir)
    engine = Engine(lambda: load_model(model_dir, dtype=dtype, batched=batch_size > 1), processor,
                    max_batch=batch_size, prefix_cache_bytes=0)  # no two clips share a prefix worth keeping
    engine.start()
    try:
        yield Transcriber(engine, processor, task)
    finally:
        engine.stop()
