"""The HTTP front: a Starlette app (run by uvicorn). Requests are validated here (media decoded in a
worker pool, off the event loop), then handed to the engine, whose Deltas come back through an
asyncio queue and go out whole or as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..decoding.tools import CallStream
from .decoding import Delta
from .engine import Engine, Job
from .errors import ApiError
from .page import page_routes
from .requests import RequestContext, parse_chat, parse_completion, parse_json
from .responses import SSE_DONE, Reply, sse
from .transcription import UPLOAD_PATHS, AudioApi

DISCONNECT_POLL_SECONDS = 0.5


LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                 b"media-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                 b"form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


@dataclass
class Security:
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    max_request_bytes: int = 32 << 20
    host: str = "127.0.0.1"  # the address the server binds
    port: int = 8080
    allowed_hosts: tuple[str, ...] = ()  # more names requests may carry in their Host header

    def host_names(self) -> set[str]:
        return {name.lower().strip("[]") for name in (self.host, *LOCAL_NAMES, *self.allowed_hosts)}

    def own_origins(self) -> set[str]:
        return {f"http://{f'[{name}]' if ':' in name else name}:{self.port}" for name in self.host_names()}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header; None when it is not one."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", value)
    if match is None:
        return None
    return match[1].strip("[]").lower(), int(match[2]) if match[2] else None


class Guard:
    """ASGI middleware, before any body is read: the Host header must name this server (a web page
    on another site that re-resolves its name to 127.0.0.1, DNS rebinding, gets 421); a browser's
    Origin must be the server's own or an allowed one (403); a POST to the API must be JSON (415: a
    cross-site form cannot send one without a CORS preflight), multipart only to the upload paths
    (a cross-site form there still carries its Origin, refused above); the API key on /v1/*; the body cap,
    checked on Content-Length and counted as the body streams in (a chunked body has no length).
    Every response carries a strict Content-Security-Policy, nosniff and no referrer."""

    def __init__(self, app, security: Security):
        self.app, self.security = app, security
        self.names, self.origins = security.host_names(), security.own_origins() | set(security.allow_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, secured_send)
        cap, received = self.security.max_request_bytes, 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise too_large(cap)
            return message

        await self.app(scope, counted_receive, secured_send)

    def refusal(self, scope, headers: dict) -> ApiError | None:
        host = split_host(headers.get("host", ""))
        if host is None or host[0] not in self.names or host[1] not in (self.security.port, None):
            return ApiError(421, f"the Host header '{headers.get('host', '')}' does not name this server "
                                 "(start it with --allowed-host NAME to answer to another name)")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return ApiError(403, f"requests from the web origin '{origin}' are refused (start the server with --allow-origin)")
        path, method = scope["path"], scope["method"]
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        expected = "multipart/form-data" if path in UPLOAD_PATHS else "application/json"
        if method == "POST" and path.startswith("/v1/") and content_type != expected:
            return ApiError(415, f"POST {path} takes Content-Type {expected}, got '{content_type or 'none'}'")
        key = self.security.api_key
        if key is not None and path.startswith("/v1/") and method != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return ApiError(401, "a valid API key is needed: Authorization: Bearer <key>")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "the Content-Length header is not a number")
            if int(length) > self.security.max_request_bytes:
                return too_large(self.security.max_request_bytes)
        return None


def too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is over {cap} bytes (the server's --max-request-bytes)")


class Api:
    def __init__(self, engine: Engine, context: RequestContext):
        self.engine, self.context = engine, context

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        created = int(time.time())
        entries = [{"id": self.context.model_id, "object": "model", "created": created, "owned_by": "mlx-gemma3n"}]
        entries += [
            {"id": name, "object": "model", "created": created, "owned_by": "mlx-gemma3n", "parent": self.context.model_id}
            for name in self.context.adapters
        ]
        return JSONResponse({"object": "list", "data": entries})

    async def chat(self, request: Request):
        return await self.generate(request, parse_chat, chat=True)

    async def completions(self, request: Request):
        return await self.generate(request, parse_completion, chat=False)

    async def generate(self, request: Request, parse, chat: bool):
        body = parse_json(await request.body())
        generation = await run_in_threadpool(parse, body, self.context)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        job = Job(generation, lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta))
        self.engine.submit(job)
        reply = Reply(chat, body["model"])
        if generation.stream:
            return StreamingResponse(self.events(job, deltas, reply), media_type="text/event-stream")
        try:
            return await self.whole(request, job, deltas, reply)
        finally:
            job.cancelled = True

    async def whole(self, request: Request, job: Job, deltas: asyncio.Queue, reply: Reply) -> JSONResponse:
        text, logprobs = [], []
        while True:
            try:
                delta = await asyncio.wait_for(deltas.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "the client went away") from None
                continue
            if delta.error is not None:
                raise delta.error
            text.append(delta.text)
            logprobs += delta.logprobs
            if delta.finish_reason is not None:
                return JSONResponse(reply.whole("".join(text), delta.finish_reason, logprobs, delta.usage, job.request.calls))

    async def events(self, job: Job, deltas: asyncio.Queue, reply: Reply):
        """SSE chunks (a reply read for tool calls sends them as OpenAI's tool-call deltas); when the
        client goes away the generator is closed and the job cancelled."""
        calls = CallStream() if job.request.calls else None
        try:
            if reply.chat:
                yield sse(reply.chunk("", None, [], first=True))
            while True:
                delta = await deltas.get()
                if delta.error is not None:
                    yield sse(delta.error.body())
                    break
                text, tool_calls, finish_reason = delta.text, [], delta.finish_reason
                if calls is not None:
                    text, tool_calls = calls.add(text)
                    if finish_reason is not None:
                        tool_calls += calls.flush()
                        finish_reason = "tool_calls" if calls.completed else finish_reason
                if text or tool_calls or delta.logprobs or finish_reason:
                    yield sse(reply.chunk(text, finish_reason, delta.logprobs, tool_calls=tool_calls))
                if delta.finish_reason is not None:
                    if job.request.include_usage:
                        yield sse(reply.usage_chunk(delta.usage))
                    break
            yield SSE_DONE
        finally:
            job.cancelled = True


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}"))


def create_app(engine: Engine, context: RequestContext, security: Security, page: bool = True) -> Starlette:
    """The app over a started engine (it stops the engine when it shuts down); `page`: serve the chat
    page at `/`."""
    api, audio = Api(engine, context), AudioApi(engine, context)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route(UPLOAD_PATHS[0], audio.transcriptions, methods=["POST"]),
        Route(UPLOAD_PATHS[1], audio.translations, methods=["POST"]),
        *(page_routes() if page else []),
    ]
    middleware = [Middleware(Guard, security=security)]
    if security.allow_origins:
        cors = Middleware(CORSMiddleware, allow_origins=list(security.allow_origins), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"])
        middleware.insert(0, cors)
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            engine.stop()

    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
