"""One sequence's decoding: its sampler (penalties, grammar, seed), log-probabilities, stop rules and
the text it has shown, advanced one token at a time by the engine."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from ..decoding.sampling import sample
from ..generate import StreamingDetokenizer
from .requests import GenerationRequest


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    """What one engine step adds to a reply; the last one has a finish_reason (or an error) and usage."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: Exception | None = None


class StopMatcher:
    """Holds back text that may be the start of a stop sequence; the stop sequence is never shown."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop sequence ended the reply)."""
        if not self.stops:
            return text, False
        self.pending += text
        found = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if found:
            shown, self.pending = self.pending[: min(found)], ""
            return shown, True
        held = max((n for stop in self.stops for n in range(1, len(stop)) if self.pending.endswith(stop[:n])), default=0)
        shown, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return shown, False

    def flush(self) -> str:
        shown, self.pending = self.pending, ""
        return shown


class Decoder:
    def __init__(self, request: GenerationRequest, processor, eos_ids: set[int], grammar=None):
        self.request, self.processor, self.eos_ids, self.grammar = request, processor, eos_ids, grammar
        self.params = request.params
        self.recent = list(request.prompt.ids[-self.params.repetition_context :])
        self.counts: Counter[int] = Counter()
        self.key = None if request.seed is None else mx.random.key(request.seed)
        self.detokenizer = StreamingDetokenizer(processor)
        self.stop = StopMatcher(request.stop)
        self.generated = 0

    def penalized(self, logits: mx.array) -> mx.array:
        """OpenAI's presence and frequency penalties over the tokens generated so far, and the grammar."""
        request = self.request
        if self.counts and (request.presence_penalty or request.frequency_penalty):
            ids = mx.array(list(self.counts))
            counts = mx.array(list(self.counts.values()), dtype=logits.dtype)
            logits[:, ids] = logits[:, ids] - (request.frequency_penalty * counts + request.presence_penalty)
        return logits if self.grammar is None else self.grammar.restrict(logits)

    def choose(self, logits: mx.array):
        """The next token (lazy) from last-position logits (1, V), and its log-probabilities if asked."""
        context = mx.array(self.recent[-self.params.repetition_context :]) if self.params.repetition_penalty != 1.0 else None
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        token = sample(self.penalized(logits), self.params, context, key)
        if not self.request.logprobs:
            return token, None
        logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
        top = mx.argsort(-logprobs)[: self.request.top_logprobs] if self.request.top_logprobs else mx.array([], dtype=mx.int32)
        return token, (logprobs, top)

    def advance(self, token: int, logprob_arrays) -> Delta:
        """Take the sampled token: the text it shows and, if the reply ends here, why."""
        self.generated += 1
        self.recent.append(token)
        self.counts[token] += 1
        delta = Delta(logprobs=[self.logprob_entry(token, *logprob_arrays)] if logprob_arrays else [])
        if token in self.eos_ids:
            delta.text, delta.finish_reason = self.stop.add(self.detokenizer.flush())[0] + self.stop.flush(), "stop"
            return delta
        if self.grammar is not None:
            self.grammar.accept(token)
        delta.text, stopped = self.stop.add(self.detokenizer.add(token))
        complete = self.grammar is not None and self.grammar.finished
        if stopped:
            delta.finish_reason = "stop"
        elif complete or self.generated >= self.request.max_tokens:
            tail, stopped = self.stop.add(self.detokenizer.flush())
            delta.text += tail if stopped else tail + self.stop.flush()
            delta.finish_reason = "stop" if stopped or complete else "length"
        return delta

    def logprob_entry(self, token: int, logprobs: mx.array, top: mx.array) -> TokenLogprob:
        return TokenLogprob(
            self.processor.decode([token]),
            logprobs[token].item(),
            [(self.processor.decode([i]), logprobs[i].item()) for i in top.tolist()],
        )
