"""The HTTP side of `hnet serve`: a FastAPI app over the scheduler (OpenAI's routes, SSE streaming).

Handlers read the raw body and parse it themselves (protocol.py), so malformed JSON, wrong types
and bad values all get OpenAI's error shape with a 4xx status. Each request hands the scheduler an
`emit` callback that moves events onto the event loop; a streaming response ends with a final
chunk carrying finish_reason and `data: [DONE]`. When the client goes away (a closed stream, or
a disconnect noticed while a plain request waits), its job is cancelled and its batch row freed
at the scheduler's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .protocol import Limits, Parsed, RequestError, Response, error_body, parse_chat, parse_completion
from .scheduler import QueueFull, Scheduler, ShuttingDown

RETRY_AFTER = "1"  # seconds a client told 503 (queue full) should wait
DISCONNECT_POLL = 0.5  # seconds between disconnect checks of a waiting plain request


def _error(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER} if e.status == 503 else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Guard:
    """ASGI middleware: the API key (when set; /health stays open) and the body size, checked before
    a handler runs. Plain ASGI rather than BaseHTTPMiddleware, so streaming and disconnects pass
    through untouched."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = None
            if self.api_key is not None and scope["path"] != "/health":
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    refusal = RequestError(401, "a valid API key is required (Authorization: Bearer ...)")
            length = headers.get("content-length", "")
            if refusal is None and length.isdigit() and int(length) > self.max_body:
                refusal = RequestError(413, f"the request body is larger than {self.max_body} bytes")
            if refusal is not None:
                await _error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(scheduler: Scheduler, model_name: str, limits: Limits, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close(grace=0)  # uvicorn has drained connections (or its grace ran out): cancel the rest

    app = FastAPI(title="hnet serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    max_body = 6 * limits.max_prompt_bytes + 65536  # a JSON string escapes a byte in at most 6 characters
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if scheduler.accepting else "stopping", **scheduler.load()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "hnet"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, parse_chat, chat=True)

    async def _generate(request: Request, parse, chat: bool):
        body = await request.body()
        if len(body) > max_body:
            return _error(RequestError(413, f"the request body is larger than {max_body} bytes"))
        try:
            parsed: Parsed = parse(body, limits, model_name)
        except RequestError as e:
            return _error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown outlasted its grace): nobody is listening
                pass

        try:
            job = scheduler.submit(parsed.request, emit)
        except QueueFull:
            return _error(RequestError(503, "the server is busy (its queue is full); retry later"))
        except ShuttingDown:
            return _error(RequestError(503, "the server is shutting down"))
        response = Response(chat, parsed.model)
        if parsed.stream:
            return StreamingResponse(_stream(job, events, response), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, job, events, response)

    async def _complete(request: Request, job, events: asyncio.Queue, response: Response):
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    return JSONResponse(response.full("".join(pieces), *event[1:]))
                else:
                    return JSONResponse(error_body(event[2], "server_error" if event[1] >= 500 else "timeout"),
                                        status_code=event[1])
        finally:
            job.cancel()  # a no-op for a finished job; frees the row of an abandoned one

    async def _stream(job, events: asyncio.Queue, response: Response) -> AsyncIterator[str]:
        try:
            if response.chat:
                yield _sse(response.chunk("", first=True))
            pending: list = []
            while True:
                if not pending:
                    pending.append(await events.get())
                    while not events.empty():
                        pending.append(events.get_nowait())
                if pending[0][0] == "text":
                    # Bytes that came while the last chunk was being sent go out together, in one chunk.
                    text = []
                    while pending and pending[0][0] == "text":
                        text.append(pending.pop(0)[1])
                    yield _sse(response.chunk("".join(text)))
                    continue
                event = pending.pop(0)
                if event[0] == "done":
                    final = response.chunk(None if response.chat else "", reason=event[1])
                    final["usage"] = Response.usage(event[2], event[3])
                    yield _sse(final)
                    break
                else:
                    yield _sse(error_body(event[2], "server_error" if event[1] >= 500 else "timeout"))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects (the generator is closed or cancelled)
            job.cancel()

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
