"""Text generation: the Python API (`generate`, `stream_generate`) and the decoding session behind it.

A `Session` owns a KV cache and the exact list of tokens whose keys/values it holds, so a chat can
keep its cache across turns and only prefill what is new. The CLI (`python -m mlx_gemma3n.generate`)
lives in `cli.py`; this is a package so that running it as a module is clean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from ..decoding.constraints import Constraints, read_constraints
from ..decoding.grammar import GrammarMatcher, grammars_for
from ..decoding.sampling import SamplingParams, sample
from ..decoding.tool_prompt import prepare_chat
from ..decoding.tools import parse_calls
from ..errors import Gemma3nError
from ..inputs.processor import Prompt


@dataclass
class GenerationResponse:
    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length", "tool_calls" or None while generating
    tool_calls: list[dict] | None = None  # on the last response of a reply that may call tools: OpenAI's shape


@dataclass
class Reply:
    """What `generate` returns when tools are given: the text (None when the model wrote calls, even
    one cut short by max_tokens) and the complete calls, as the server's `message` has them."""

    content: str | None
    tool_calls: list[dict]
    finish_reason: str


class StreamingDetokenizer:
    """Emits text as tokens arrive; the concatenation equals Transformers' `decode` of all the ids.

    A run of byte-fallback tokens decodes as a whole (valid UTF-8, or one U+FFFD per byte), so text
    is held back while the run may go on: after a byte token, and after a special token that is left
    out (the bytes on both sides of it join). The current segment of tokens is decoded, and a new
    segment starts once its text is out, so the work per token stays bounded; Gemma's decoder has no
    context-dependent stripping, so segments decoded apart concatenate to the whole. Special tokens
    (`<image_soft_token>`, ...) are left out unless `skip_special_tokens` is False.
    """

    def __init__(self, processor, max_segment: int = 16, skip_special_tokens: bool = True):
        self.processor = processor
        self.max_segment = max_segment
        self.skip_special_tokens = skip_special_tokens
        self.segment: list[int] = []
        self.emitted = 0

    def run_may_continue(self, token: int) -> bool:
        if token in self.processor.byte_token_ids:
            return True
        return self.skip_special_tokens and token in self.processor.special_token_ids

    def add(self, token: int) -> str:
        self.segment.append(token)
        if self.run_may_continue(token):
            return ""
        text = self.processor.decode(self.segment, self.skip_special_tokens)
        new = text[self.emitted :]
        self.emitted = len(text)
        if len(self.segment) >= self.max_segment:
            self.segment, self.emitted = [], 0
        return new

    def flush(self) -> str:
        text = self.processor.decode(self.segment, self.skip_special_tokens)[self.emitted :]
        self.segment, self.emitted = [], 0
        return text


def prepare_prompt(processor, prompt, system: str | None = None, constraints: Constraints = Constraints()) -> Prompt:
    """A prompt as a string (one user turn), HF-format chat messages (content strings or parts with
    text, images, audio and video; assistant `tool_calls` and `tool` turns), or ready token ids."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        if constraints.tools:
            raise Gemma3nError("tools need a chat prompt (a string or messages), not token ids")
        return Prompt(list(prompt))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Gemma3nError("the prompt is empty")
        if not processor.chat_template and system is None and not constraints.tools:
            return Prompt(processor.encode(prompt))
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise Gemma3nError("the prompt must be a non-empty string, a list of chat messages or a list of token ids")
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return prepare_chat(processor, messages, constraints)


def sampling_params(processor, **overrides) -> SamplingParams:
    """The model's generation_config.json defaults, overridden by the non-None arguments."""
    defaults = processor.generation_config
    values = {
        "temperature": defaults.get("temperature", 1.0) if defaults.get("do_sample", True) else 0.0,
        "top_k": defaults.get("top_k", 0) or 0,
        "top_p": defaults.get("top_p", 1.0) or 1.0,
        "min_p": defaults.get("min_p", 0.0) or 0.0,
        "repetition_penalty": defaults.get("repetition_penalty", 1.0) or 1.0,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**values)


class Session:
    """A KV cache plus the tokens it holds; `stream` continues it with new tokens."""

    def __init__(self, model, processor, cache=None, history: list[int] | None = None):
        self.model = model
        self.processor = processor
        self.cache = cache if cache is not None else model.make_cache()
        self.history = list(history or [])
        self.eos_ids = set(processor.eos_token_ids) | set(model.config.eos_token_ids)

    @property
    def context_limit(self) -> int:
        return self.model.config.text.max_position_embeddings

    def prefill(self, tokens: list[int], step_size: int, embeddings: mx.array | None = None) -> mx.array:
        """Feed `tokens` in chunks (with their `embeddings` when media are merged in); return the
        logits of the last one."""
        for start in range(0, len(tokens), step_size):
            chunk = slice(start, start + step_size)
            logits = self.model(
                mx.array([tokens[chunk]]), cache=self.cache, last_token_only=True,
                embeddings=None if embeddings is None else embeddings[:, chunk],
            )
            mx.eval(logits, [c.state for c in self.cache])
        self.history.extend(tokens)
        return logits[:, -1]

    def stream(
        self,
        prompt: Prompt | list[int],
        params: SamplingParams,
        max_tokens: int,
        prefill_step_size: int = 512,
        skip_special_tokens: bool = True,
        grammar: GrammarMatcher | None = None,
    ) -> Iterator[GenerationResponse]:
        """Continue the cache with the prompt's tokens (and media), then generate (under `grammar`:
        only the tokens it allows, ending when it is complete). The responses' text leaves special
        tokens out unless `skip_special_tokens` is False; their `token` is every id."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        tokens = prompt.ids
        if max_tokens <= 0:
            raise Gemma3nError(f"max_tokens must be > 0, got {max_tokens}")
        if not tokens:
            raise Gemma3nError("nothing to generate from: no new prompt tokens")
        total = len(self.history) + len(tokens)
        if total >= self.context_limit:
            raise Gemma3nError(f"the prompt has {total} tokens, over the model's context of {self.context_limit}")
        max_tokens = min(max_tokens, self.context_limit - total)
        mx.reset_peak_memory()
        detokenizer = StreamingDetokenizer(self.processor, skip_special_tokens=skip_special_tokens)
        recent = self.history[-params.repetition_context :] + tokens

        def next_token(logits):
            context = mx.array(recent[-params.repetition_context :]) if params.repetition_penalty != 1.0 else None
            return sample(logits if grammar is None else grammar.restrict(logits), params, context)

        start = time.perf_counter()
        embeddings = None
        if prompt.images or prompt.audio:
            embeddings = self.model.embed_with_media(mx.array([tokens]), prompt.images, prompt.audio)
        token = next_token(self.prefill(tokens, prefill_step_size, embeddings))
        mx.eval(token)
        prompt_time = time.perf_counter() - start
        prompt_tps = len(tokens) / prompt_time
        start = time.perf_counter()
        for n in range(1, max_tokens + 1):
            token_id = token.item()
            recent.append(token_id)
            if grammar is not None and token_id not in self.eos_ids:
                grammar.accept(token_id)
            ended = token_id in self.eos_ids or (grammar is not None and grammar.finished)
            finish = "stop" if ended else ("length" if n == max_tokens else None)
            if finish is None:
                # Launch the next step before handing this token out: the device works meanwhile.
                token = next_token(self.model(mx.array([[token_id]]), cache=self.cache)[:, -1])
                mx.async_eval(token)
                self.history.append(token_id)
            text = "" if token_id in self.eos_ids else detokenizer.add(token_id)
            if finish:
                text += detokenizer.flush()
            elapsed = time.perf_counter() - start
            yield GenerationResponse(
                text=text,
                token=token_id,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=n / elapsed if elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
            )
            if finish:
                return


class ChatSession:
    """A multi-turn chat that keeps its KV cache: each turn feeds only the new text.

    The cache holds the model's replies as generated; the chat template's rendering of a past reply
    may differ (it trims whitespace), so a turn appends only what the template puts after the last
    reply (found by rendering a placeholder in its place) and feeds the difference as text.
    """

    PLACEHOLDER = "\x00reply\x00"

    def __init__(self, model, processor, system: str | None = None):
        self.model, self.processor = model, processor
        self.messages = [{"role": "system", "content": system}] if system else []
        self.session: Session | None = None
        self.text = ""  # what the conversation so far says, as the cache should hold it
        self.last_prompt_tokens: list[int] = []

    def _render(self, messages) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def turn_tokens(self, content) -> list[int]:
        """Record the user's turn (a string or content parts); the tokens the cache still needs."""
        previous = self.messages
        self.messages = previous + self.processor.expand_parts([{"role": "user", "content": content}])
        if self.session is not None and previous and previous[-1]["role"] == "assistant":
            with_placeholder = previous[:-1] + [{"role": "assistant", "content": self.PLACEHOLDER}]
            rendered = self._render(with_placeholder + self.messages[-1:])
            target = self.text + self.processor.expand_media_placeholders(rendered.split(self.PLACEHOLDER, 1)[1])
            held = self.processor.decode(self.session.history)
            if target.startswith(held):
                self.text = target
                return self.processor.encode(target[len(held) :], add_bos=False)
        self.text = self.processor.expand_media_placeholders(self._render(self.messages))
        self.session = Session(self.model, self.processor)
        return self.processor.encode(self.text, add_bos=False)

    def ask(
        self,
        content,
        params: SamplingParams,
        max_tokens: int = 256,
        prefill_step_size: int = 512,
        skip_special_tokens: bool = True,
    ):
        """Stream the reply to one user turn: a string, or HF content parts (text, image, audio, video)."""
        tokens = self.turn_tokens(content)
        held = len(self.session.history)
        # only this turn's media are new unless the cache was rebuilt from the whole conversation
        images, audio = self.processor.load_media(self.messages if held == 0 else self.messages[-1:])
        self.last_prompt_tokens = tokens
        reply, generated = [], []
        prompt = Prompt(tokens, images, audio)
        for response in self.session.stream(prompt, params, max_tokens, prefill_step_size, skip_special_tokens):
            reply.append(response.text)
            if response.finish_reason != "stop":
                generated.append(response.token)
            yield response
        # the cache holds every generated token, special ones included; the history keeps what was shown
        self.text += self.processor.decode(generated)
        self.messages.append({"role": "assistant", "content": "".join(reply)})


def stream_generate(
    model,
    processor,
    prompt,
    max_tokens: int = 256,
    *,
    system: str | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    prefill_step_size: int = 512,
    skip_special_tokens: bool = True,
    tools=None,
    tool_choice=None,
    parallel_tool_calls: bool | None = None,
    response_format: dict | None = None,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt`: a string, HF-format chat messages (content parts may carry
    images `{"type": "image", "image": path/URL/PIL/array}`, audio `{"type": "audio", "audio":
    path/array}` and video `{"type": "video", "video": path/bytes/frames}` (`processor.video_parts`
    shows what it becomes); assistant messages may carry OpenAI `tool_calls`, and `{"role": "tool",
    "tool_call_id": ..., "content": ...}` messages answer them), or token ids.

    Sampling defaults come from the model's generation_config.json; temperature 0 is greedy. The text
    leaves out special tokens (as Transformers' `decode(..., skip_special_tokens=True)`) unless
    `skip_special_tokens` is False; each response's `token` is the generated id, whatever it is.

    `tools` (OpenAI tool dicts or Python functions with type hints), `tool_choice` ("auto", "none",
    "required" or {"type": "function", "function": {"name": ...}}) and `parallel_tool_calls` work as
    in OpenAI's API: the reply is generated under a grammar of the tools' calls, its text is the
    model's (a call is a JSON line), and the last response's `tool_calls` holds the calls it made
    (finish_reason "tool_calls"). `response_format` ({"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"schema": ...}}) constrains a reply without tools. Both need
    llguidance.
    """
    params = sampling_params(
        processor, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty
    )
    eos_ids = set(processor.eos_token_ids) | set(model.config.eos_token_ids)

    def grammars():
        return grammars_for(processor, model.config.text.vocab_size, eos_ids)

    constraints = read_constraints(grammars, tools, tool_choice, parallel_tool_calls, response_format)
    if seed is not None:
        mx.random.seed(seed)
    prepared = prepare_prompt(processor, prompt, system, constraints)
    grammar = None if constraints.grammar is None else grammars().matcher(constraints.grammar)
    responses = Session(model, processor).stream(prepared, params, max_tokens, prefill_step_size, skip_special_tokens, grammar)
    if not constraints.calls:
        yield from responses
        return
    text = []
    for response in responses:
        text.append(response.text)
        if response.finish_reason is not None:
            response.tool_calls = parse_calls("".join(text))[1]
            if response.tool_calls:
                response.finish_reason = "tool_calls"
        yield response


def generate(model, processor, prompt, max_tokens: int = 256, **kwargs) -> str | Reply:
    """The whole reply to `prompt` as one string (see `stream_generate` for the arguments); with
    `tools`, a `Reply` (its content and tool calls)."""
    responses = list(stream_generate(model, processor, prompt, max_tokens, **kwargs))
    return "".join(response.text for response in responses) if kwargs.get("tools") is None else reply_of(responses)


def reply_of(responses: list[GenerationResponse]) -> Reply:
    """The Reply of a whole stream of responses."""
    text, last = "".join(response.text for response in responses), responses[-1]
    if last.tool_calls is None:
        return Reply(text, [], last.finish_reason)
    return Reply(parse_calls(text)[0], last.tool_calls, last.finish_reason)
