"""The HTTP front: a Starlette app (run by uvicorn). Requests are validated here (media decoded in a
worker pool, off the event loop), then handed to the engine, whose Deltas come back through an
asyncio queue and go out whole or as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
from .requests import RequestContext, parse_chat, parse_completion, parse_json
from .responses import SSE_DONE, Reply, sse

DISCONNECT_POLL_SECONDS = 0.5


@dataclass
class Security:
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    max_request_bytes: int = 32 << 20


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Guard:
    """ASGI middleware: the API key on /v1/*, and the body cap, checked on Content-Length before any
    body is read and counted as the body streams in (a chunked body has no length)."""

    def __init__(self, app, security: Security):
        self.app, self.security = app, security

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        cap, received = self.security.max_request_bytes, 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise too_large(cap)
            return message

        await self.app(scope, counted_receive, send)

    def refusal(self, scope, headers: dict) -> ApiError | None:
        key = self.security.api_key
        if key is not None and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
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


def create_app(engine: Engine, context: RequestContext, security: Security) -> Starlette:
    """The app over a started engine (it stops the engine when it shuts down)."""
    api = Api(engine, context)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
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
