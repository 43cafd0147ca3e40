"""An OpenAI-compatible HTTP server for one model (FastAPI + uvicorn): /v1/completions,
/v1/chat/completions (both with `stream: true` as server-sent events), /v1/models and /health.

Requests are validated by pydantic models; every client error is a 4xx with an OpenAI-style body
{"error": {"message", "type"}}. Generation runs on the engine's worker thread (`moeforge.inference.engine`);
the event loop only relays text, so /health answers while a long request decodes. Shutdown (Ctrl-C /
SIGTERM): uvicorn stops accepting connections and lets running responses finish, then the engine fails
whatever still waits and stops its worker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .engine import Engine, EngineBusy, Job
from .sampling import SamplingParams

MAX_STOP_STRINGS = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain template (the byte-level and trained tokenizers have none): 'role: content' lines, then
    'assistant:' for the model to continue."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class _ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(engine: Engine, model_name: str = "moeforge", default_max_tokens: int = 16) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="moeforge", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(_ClientError)
    async def _client_error(request: Request, exc: _ClientError):
        return error(exc.status, str(exc), "server_busy" if exc.status == 503 else "invalid_request_error")

    @app.get("/health")
    async def health():
        return {"status": "closing" if engine.closing else "ok", "model": model_name,
                "waiting": engine.queue.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "moeforge"}]}

    def make_job(req: _Request, prompt: str, on_event) -> Job:
        if req.model not in (None, model_name):
            raise _ClientError(404, f"model {req.model!r} not found; this server has {model_name!r}")
        ids = engine.tokenizer.encode(prompt) or list(engine.stop_ids[:1]) or [0]
        max_tokens = default_max_tokens if req.max_tokens is None else req.max_tokens
        if len(ids) + max_tokens > engine.context:
            raise _ClientError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                    f"model's context of {engine.context} tokens")
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise _ClientError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        try:
            params = SamplingParams(req.temperature, req.top_k, None if req.top_p >= 1 else req.top_p)
        except ConfigError as e:
            raise _ClientError(400, str(e)) from None
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        return Job(ids, max_tokens, params, seed, stops, on_event)

    async def run(req: _Request, prompt: str, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = make_job(req, prompt, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(job)
        except EngineBusy as e:
            raise _ClientError(503, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = lambda n: {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(job.prompt_ids) + n}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [choice]}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                body = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        if req.stream:
            async def sse():
                try:
                    if chat:
                        yield chunk(None, None, first=True)
                    while True:
                        ev = await events.get()
                        if ev[0] == "text":
                            yield chunk(ev[1], None)
                        elif ev[0] == "done":
                            yield chunk(None, ev[1])
                            break
                        else:
                            yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or we are done): stop decoding for it
                    job.cancelled.set()

            return StreamingResponse(sse(), media_type="text/event-stream")

        parts = []
        try:
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    parts.append(ev[1])
                elif ev[0] == "done":
                    reason, n = ev[1], ev[2]
                    break
                else:
                    return error(503 if "shutting down" in ev[1] else 500, ev[1], "server_error")
        finally:
            job.cancelled.set()
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage(n)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise _ClientError(400, "prompt: send one prompt per request (a string or a list of one)")
            prompt = prompt[0]
        return await run(req, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        return await run(req, chat_prompt(req.messages), chat=True)

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          default_max_tokens: int = 16) -> None:
    """Run until Ctrl-C / SIGTERM (uvicorn's graceful shutdown, then the engine's)."""
    import uvicorn

    uvicorn.run(create_app(engine, model_name, default_max_tokens), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=30)
