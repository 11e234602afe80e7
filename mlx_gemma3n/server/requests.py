"""Request bodies of /v1/chat/completions and /v1/completions -> `GenerationRequest`, every field
checked: a wrong type, a value out of range, an unknown role or a field we do not do is a 400 that
names the field (never a framework's 422, never silently ignored)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..decoding.constraints import Constraints, read_constraints
from ..decoding.grammar import INSTALL_HINT, Grammars
from ..decoding.tool_prompt import prepare_chat
from ..errors import Gemma3nError, ParameterError
from ..generate import sampling_params
from ..inputs.processor import Prompt
from .errors import ApiError, bad_request
from .media import MediaLimits, audio_from_part, image_from_url, video_from_url

COMMON_FIELDS = {
    "model", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "response_format", "stream", "stream_options", "n", "user",
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = {"system": {"content"}, "user": {"content"}, "assistant": {"content", "tool_calls"}, "tool": {"content", "tool_call_id"}}
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationRequest:
    prompt: Prompt
    media_digests: tuple[tuple[str, ...], tuple[str, ...]]  # (images, audio clips), in prompt order
    max_tokens: int
    params: object  # sampling.SamplingParams
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    adapter: str | None = None
    grammar: str | None = None  # an llguidance grammar
    calls: bool = False  # whether the reply is read for tool calls
    stream: bool = False
    include_usage: bool = False


@dataclass
class RequestContext:
    """What validation needs to know about the server."""

    processor: object
    model_id: str
    adapters: tuple[str, ...]
    limits: MediaLimits
    context_limit: int
    default_max_tokens: int
    grammars: Grammars | None

    def grammars_or_error(self) -> Grammars:
        if self.grammars is None:
            raise Gemma3nError(f"constrained decoding is off on this server ({INSTALL_HINT}, and a tokenizer it can read)")
        return self.grammars


def parse_json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object")
    return value


def check_fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad_request(f"'{name}' is not supported by this server", name)


def number(body: dict, name: str, low=None, high=None, integer=False, low_open=False):
    """body[name] (None when absent or null), a number (an int if `integer`) within [low, high]."""
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise bad_request(f"'{name}' must be in {bounds}, got {value}", name)
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false", name)
    return value


def unsupported_unless(body: dict, name: str, allowed) -> None:
    if name in body and body[name] not in allowed:
        raise bad_request(f"'{name}' = {json.dumps(body[name])} is not supported by this server", name)


def resolve_model(body: dict, context: RequestContext) -> str | None:
    """The adapter a request's `model` names (None: the base model). Only names given at start."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad_request("'model' must be a string: the served model's id or an adapter's name", "model")
    if name == context.model_id:
        return None
    adapter = name.removeprefix(f"{context.model_id}:")
    if adapter in context.adapters:
        return adapter
    raise ApiError(404, f"the model '{name}' is not served here (GET /v1/models lists those that are)", "model")


def stop_sequences(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return stops


def count_images(counts: dict, added: int, where: str, limits: MediaLimits) -> None:
    counts["images"] += added
    if counts["images"] > limits.max_images:
        raise bad_request(f"{where}: a request takes at most {limits.max_images} images (a video's frames count as images)", where)


def count_audio(counts: dict, samples, rate: int, where: str, limits: MediaLimits) -> None:
    counts["audio_seconds"] += len(samples) / rate
    if counts["audio_seconds"] > limits.max_audio_seconds:
        raise ApiError(413, f"{where}: a request takes at most {limits.max_audio_seconds:g} s of audio", where)


def media_url(part: dict, kind: str, where: str) -> str:
    """The `url` of an `image_url` / `video_url` part ({url} or the URL itself)."""
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise bad_request(f"{where}.{kind}.url must be a string", f"{where}.{kind}.url")
    return url


def chat_content(content, param: str, role: str, context: RequestContext, counts: dict):
    """OpenAI content (a string or parts) -> HF content: text, PIL images, audio sample arrays (a video
    as its frames and sound, `Processor.video_parts`' layout)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{param} must be a string or a non-empty list of content parts", param)
    limits, rate = context.limits, context.processor.audio_settings.sampling_rate
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_audio", "video_url") and role != "user":
            raise bad_request(f"{where}: only user messages may carry images, audio and video", where)
        elif kind == "image_url":
            count_images(counts, 1, where, limits)
            parts.append({"type": "image", "image": image_from_url(media_url(part, kind, where), f"{where}.image_url.url", limits)})
        elif kind == "input_audio":
            samples = audio_from_part(part.get("input_audio"), f"{where}.input_audio", rate, limits.max_audio_seconds)
            count_audio(counts, samples, rate, where, limits)
            parts.append({"type": "audio", "audio": samples})
        elif kind == "video_url":
            video = video_from_url(media_url(part, kind, where), f"{where}.video_url.url", limits, rate)
            count_images(counts, len(video.frames), where, limits)
            if video.audio is not None:
                count_audio(counts, video.audio, rate, where, limits)
            parts += video.parts()
        else:
            raise bad_request(f"{where} must be a text, image_url, input_audio or video_url part", where)
    return parts


def chat_messages(body: dict, context: RequestContext) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    counts = {"images": 0, "audio_seconds": 0.0}
    converted = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object", param)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{param}.role {json.dumps(role)} is not one of {', '.join(ROLES)}", f"{param}.role")
        for key in message:
            if key != "role" and key not in MESSAGE_FIELDS[ROLES[role]]:
                raise bad_request(f"{param}.{key} is not supported on a {role} message", f"{param}.{key}")
        calls_only = message.get("tool_calls") is not None and message.get("content") is None
        content = None if calls_only else chat_content(message.get("content"), f"{param}.content", role, context, counts)
        converted.append({"role": ROLES[role], "content": content} | {k: message[k] for k in ("tool_calls", "tool_call_id") if k in message})
    return converted


def digest(*arrays) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(str(array.shape).encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def media_digests(prompt: Prompt) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hashes of the preprocessed media: two prompts with the same ids and other media differ."""
    return tuple(digest(image) for image in prompt.images), tuple(digest(*clip) for clip in prompt.audio)


def request_constraints(body: dict, context: RequestContext) -> Constraints:
    try:
        return read_constraints(context.grammars_or_error, body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"),
                                body.get("response_format"))
    except ParameterError as exc:
        raise bad_request(str(exc), exc.param) from None
    except Gemma3nError as exc:  # no grammars on this server
        raise bad_request(str(exc), "tools" if body.get("tools") is not None else "response_format") from None


def generation_request(body: dict, prompt: Prompt, context: RequestContext, adapter, max_tokens, logprobs, top_logprobs,
                       constraints: Constraints) -> GenerationRequest:
    """The fields chat and completions share."""
    unsupported_unless(body, "n", (1, None))
    if "user" in body and not isinstance(body["user"], (str, type(None))):
        raise bad_request("'user' must be a string", "user")
    limit = context.context_limit
    if len(prompt.ids) >= limit:
        raise bad_request(f"the prompt has {len(prompt.ids)} tokens, over the model's context of {limit}", "messages" if "messages" in body else "prompt")
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("'stream_options' takes {include_usage: bool}, with stream true", "stream_options")
    try:
        params = sampling_params(
            context.processor,
            temperature=number(body, "temperature", 0, 2),
            top_p=number(body, "top_p", 0, 1, low_open=True),
            top_k=number(body, "top_k", 0, integer=True),
            min_p=number(body, "min_p", 0, 1),
            repetition_penalty=number(body, "repetition_penalty", 0, low_open=True),
        )
    except Gemma3nError as exc:
        raise bad_request(str(exc)) from None
    return GenerationRequest(
        prompt=prompt,
        media_digests=media_digests(prompt),
        max_tokens=min(max_tokens or context.default_max_tokens, limit - len(prompt.ids)),
        params=params,
        presence_penalty=number(body, "presence_penalty", -2, 2) or 0.0,
        frequency_penalty=number(body, "frequency_penalty", -2, 2) or 0.0,
        seed=number(body, "seed", integer=True),
        stop=stop_sequences(body),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        adapter=adapter,
        grammar=constraints.grammar,
        calls=constraints.calls,
        stream=stream,
        include_usage=flag(options or {}, "include_usage"),
    )


def parse_chat(body: dict, context: RequestContext) -> GenerationRequest:
    check_fields(body, CHAT_FIELDS)
    adapter = resolve_model(body, context)
    messages = chat_messages(body, context)
    constraints = request_constraints(body, context)
    try:
        prompt = prepare_chat(context.processor, messages, constraints)
    except ParameterError as exc:
        raise bad_request(str(exc), exc.param) from None
    except Gemma3nError as exc:
        raise bad_request(str(exc), "messages") from None
    max_tokens = number(body, "max_completion_tokens", 1, integer=True) or number(body, "max_tokens", 1, integer=True)
    logprobs = flag(body, "logprobs")
    top_logprobs = number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return generation_request(body, prompt, context, adapter, max_tokens, logprobs, top_logprobs or 0, constraints)


def parse_completion(body: dict, context: RequestContext) -> GenerationRequest:
    check_fields(body, COMPLETION_FIELDS)
    adapter = resolve_model(body, context)
    unsupported_unless(body, "echo", (False, None))
    unsupported_unless(body, "suffix", (None,))
    unsupported_unless(body, "best_of", (1, None))
    text = body.get("prompt")
    if not isinstance(text, str):
        raise bad_request("'prompt' must be a string (raw text: no chat template is applied)", "prompt")
    ids = context.processor.encode(text)
    if not ids:
        raise bad_request("'prompt' is empty", "prompt")
    top_logprobs = number(body, "logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    max_tokens = number(body, "max_tokens", 1, integer=True)
    constraints = request_constraints(body, context)
    return generation_request(body, Prompt(ids), context, adapter, max_tokens, top_logprobs is not None, top_logprobs or 0, constraints)
