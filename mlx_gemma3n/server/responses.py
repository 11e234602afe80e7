"""OpenAI response bodies: chat.completion(.chunk) and text_completion, whole or as SSE chunks."""

from __future__ import annotations

import json
import time
import uuid

from ..decoding.tools import parse_calls
from .decoding import TokenLogprob, Usage


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class Reply:
    """Builds the bodies of one reply: `chat` (chat.completion) or not (text_completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def logprobs_body(self, entries: list[TokenLogprob]) -> dict | None:
        if not entries:
            return None
        if self.chat:
            return {"content": [
                {"token": e.token, "logprob": e.logprob, "bytes": token_bytes(e.token),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": token_bytes(t)} for t, lp in e.top]}
                for e in entries
            ]}
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
        }

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, logprobs: list[TokenLogprob], usage: Usage, calls: bool = False) -> dict:
        """`calls`: the text is read for tool calls (content null when it holds them)."""
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": self.logprobs_body(logprobs)}
        if self.chat:
            content, tool_calls = parse_calls(text) if calls else (text, [])
            choice["message"] = {"role": "assistant", "content": content} | ({"tool_calls": tool_calls} if tool_calls else {})
            if tool_calls:
                choice["finish_reason"] = "tool_calls"
        else:
            choice["text"] = text
        return dict(self.envelope([choice], chunk=False), usage=usage_body(usage))

    def chunk(self, text: str, finish_reason: str | None, logprobs: list[TokenLogprob], first: bool = False,
              tool_calls: list[dict] | None = None) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": self.logprobs_body(logprobs)}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {}) | (
                {"tool_calls": tool_calls} if tool_calls else {})
        else:
            choice["text"] = text
        return self.envelope([choice], chunk=True)

    def usage_chunk(self, usage: Usage) -> dict:
        return dict(self.envelope([], chunk=True), usage=usage_body(usage))


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
