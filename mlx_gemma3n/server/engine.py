"""Continuous batching: one worker thread owns the model and runs every MLX call.

Requests wait in a bounded queue and join the running batch between steps, up to `max_batch`. Each
step prefills one chunk of the oldest prompt still prefilling (so a long prompt does not stall the
streams already running), then samples every ready sequence's next token and runs them through the
model together: one forward for the whole batch (one per adapter in use), each row on its own cache
and position (cache.RowCaches), so each row's output is the one it gets alone. A sequence leaves when
it finishes, when its request is cancelled (the client went away) or when it fails.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable

import mlx.core as mx

from ..architecture.cache import batched_cache
from ..errors import Gemma3nError
from .decoding import Decoder, Delta, Usage
from .errors import ApiError
from .prefix_cache import PrefixCache
from .requests import GenerationRequest


@dataclass(eq=False)  # compared by identity: a request's media are arrays
class Job:
    """A request handed to the engine; `deliver` is called from the worker thread with each Delta."""

    request: GenerationRequest
    deliver: Callable[[Delta], None]
    cancelled: bool = False


@dataclass(eq=False)
class Sequence:
    job: Job
    decoder: Decoder
    cache: list
    to_prefill: list[int]  # prompt ids not yet in the cache
    media: tuple[list, list]  # the images and audio clips whose placeholders lie in `to_prefill`
    embeddings: mx.array | None = None  # of `to_prefill`, when the prompt has media
    prefilled: int = 0
    cached_tokens: int = 0
    logits: mx.array | None = None  # (1, V): where the next token is sampled from
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.to_prefill)


class Engine:
    def __init__(self, load_model: Callable[[], object], processor, *, max_batch: int = 8, max_queue: int = 64,
                 prefill_step: int = 512, prefix_cache_bytes: int = 1 << 30, grammars=None):
        """`load_model` runs in the worker thread: MLX arrays (lazy ones too, like the towers' weights
        left in their files) belong to the thread that made them."""
        self.load_model, self.processor, self.grammars = load_model, processor, grammars
        self.max_batch, self.prefill_step = max_batch, prefill_step
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.model = self.load_error = None
        self.loaded = threading.Event()
        self.running: list[Sequence] = []
        self.adapter = None
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="mlx-gemma3n-engine", daemon=True)

    def start(self):
        """Start the worker, wait for it to load the model, and return the model (its config)."""
        self.thread.start()
        self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error
        return self.model

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.waiting.maxsize} requests are already waiting; retry later") from None

    def run(self) -> None:
        try:
            self.model = self.load_model()
            self.eos_ids = set(self.processor.eos_token_ids) | set(self.model.config.eos_token_ids)
        except Exception as exc:  # noqa: BLE001 -- handed to start()
            self.load_error = exc
        self.loaded.set()
        while self.load_error is None and not self.stopping:
            self.admit()
            for sequence in [s for s in self.running if s.job.cancelled]:
                self.release(sequence)
            prefilling = [s for s in self.running if s.prefilling]
            if prefilling:
                self.guarded([prefilling[0]], self.prefill_chunk)
            ready = [s for s in self.running if not s.prefilling]
            if ready:
                self.guarded(ready, self.decode_step)
        mx.clear_streams()  # MLX needs a thread's streams destroyed as it ends, or the process aborts at exit

    def admit(self) -> None:
        """Move waiting jobs into the batch; wait for one when nothing runs."""
        while len(self.running) < self.max_batch:
            try:
                job = self.waiting.get(timeout=0.1) if not self.running else self.waiting.get_nowait()
            except queue.Empty:
                return
            if not job.cancelled:
                self.guarded_start(job)

    def guarded_start(self, job: Job) -> None:
        try:
            self.running.append(self.new_sequence(job))
        except Exception as exc:  # noqa: BLE001 -- one request's failure must not stop the worker
            job.deliver(Delta(error=failure(exc)))

    def guarded(self, sequences: list[Sequence], step) -> None:
        try:
            step(sequences)
        except Exception as exc:  # noqa: BLE001
            for sequence in sequences:
                if not sequence.finished:
                    sequence.job.deliver(Delta(error=failure(exc)))
                    self.release(sequence)

    def release(self, sequence: Sequence) -> None:
        sequence.finished = True
        if sequence in self.running:
            self.running.remove(sequence)

    def use_adapter(self, name: str | None) -> None:
        if name != self.adapter:
            self.model.set_adapter(name)
            self.adapter = name

    def new_sequence(self, job: Job) -> Sequence:
        request = job.request
        prompt = request.prompt
        grammar = self.grammars.matcher(request.grammar) if request.grammar is not None else None
        decoder = Decoder(request, self.processor, self.eos_ids, grammar)
        hit = self.prefix_cache.lookup(request.adapter, prompt.ids, request.media_digests)
        if hit is None:
            return Sequence(job, decoder, self.model.make_cache(), prompt.ids, (prompt.images, prompt.audio))
        cached, (images, audio) = len(hit.ids), hit.media
        media = (prompt.images[len(images) :], prompt.audio[len(audio) :])  # the prefix holds whole media runs
        sequence = Sequence(job, decoder, hit.restore(self.model.make_cache), prompt.ids[cached:], media, cached_tokens=cached)
        if cached == len(prompt.ids):
            sequence.logits = hit.logits
        return sequence

    def prefill_chunk(self, sequences: list[Sequence]) -> None:
        (sequence,) = sequences
        request = sequence.job.request
        self.use_adapter(request.adapter)
        tokens = sequence.to_prefill
        images, audio = sequence.media
        if sequence.prefilled == 0 and (images or audio):
            sequence.embeddings = self.model.embed_with_media(mx.array([tokens]), images, audio)
        chunk = slice(sequence.prefilled, sequence.prefilled + self.prefill_step)
        logits = self.model(
            mx.array([tokens[chunk]]), cache=sequence.cache, last_token_only=True,
            embeddings=None if sequence.embeddings is None else sequence.embeddings[:, chunk],
        )
        mx.eval(logits, [c.state for c in sequence.cache])
        sequence.prefilled = min(chunk.stop, len(tokens))
        if not sequence.prefilling:
            sequence.logits, sequence.embeddings = logits[:, -1], None
            self.prefix_cache.store(request.adapter, request.prompt.ids, request.media_digests, sequence.cache, sequence.logits)

    def decode_step(self, sequences: list[Sequence]) -> None:
        """Sample each sequence's next token, hand it out, then run the unfinished ones as one batch."""
        choices = [s.decoder.choose(s.logits) for s in sequences]
        mx.eval([token for token, _ in choices], [arrays for _, arrays in choices if arrays is not None])
        going = []
        for sequence, (token, logprob_arrays) in zip(sequences, choices):
            token_id = token.item()
            delta = sequence.decoder.advance(token_id, logprob_arrays)
            if delta.finish_reason is not None:
                delta.usage = self.usage(sequence)
                self.release(sequence)
            else:
                going.append((sequence, token_id))
            sequence.job.deliver(delta)
        by_adapter = sorted(going, key=lambda item: item[0].job.request.adapter or "")
        for adapter, group in groupby(by_adapter, key=lambda item: item[0].job.request.adapter):
            group = list(group)
            self.use_adapter(adapter)
            ids = mx.array([[token_id] for _, token_id in group])
            logits = self.model(ids, cache=batched_cache([s.cache for s, _ in group]))[:, -1]
            for row, (sequence, _) in enumerate(group):
                sequence.logits = logits[row : row + 1]
            mx.async_eval(logits)

    @staticmethod
    def usage(sequence: Sequence) -> Usage:
        return Usage(len(sequence.job.request.prompt.ids), sequence.decoder.generated, sequence.cached_tokens)


def failure(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Gemma3nError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")
