"""An OpenAI-compatible HTTP server for one model (FastAPI + uvicorn): /v1/completions,
/v1/chat/completions (both with `stream: true` as server-sent events), /v1/models and /health, plus
vLLM's /tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's `remote` tokenizer backend).

Every field of a request is either honoured or refused (the pydantic models of
`moeforge.inference.openai_api`). Every client error is a 4xx whose OpenAI-style body
{"error": {"message", "type", "param"}} names the field; nothing a client sends reaches the batch loop
unchecked (see `moeforge.inference.engine` for how one request's failure stays its own). Generation runs
on the engine's worker thread; the event loop only relays text, so /health answers while a long request
decodes. Shutdown (Ctrl-C / SIGTERM): uvicorn stops accepting connections and lets running responses
finish, then the engine fails whatever still waits and stops its worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..data import ByteTokenizer
from ..errors import ConfigError, DataError
from .engine import Engine, EngineBusy, Job, TokenLogprob
from .openai_api import (ChatRequest, CompletionRequest, DetokenizeRequest, RequestBase, TokenizeRequest,
                         MediaPart, chat_segments, validation_message)
from .sampling import SamplingParams

log = logging.getLogger("moeforge.serve")


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


class _ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _Call:
    """One decoded request: what every prompt's job shares."""

    chat: bool
    max_tokens_field: str
    max_tokens: int | None
    params: SamplingParams
    seed: int
    stops: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    echo: bool
    stream: bool
    include_usage: bool


class TokenText:
    """A token's text and bytes for logprobs. A token that is not whole UTF-8 on its own (one byte of a
    multi-byte character) is named 'bytes:\\xNN', as OpenAI does."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.cache:
            if isinstance(self.tokenizer, ByteTokenizer):
                raw = bytes([token]) if 0 < token < 256 else b""
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:
                text = self.tokenizer.decode([token])
                raw = text.encode("utf-8")
            self.cache[token] = (text, list(raw))
        return self.cache[token]


def create_app(engine: Engine, model_name: str = "moeforge", default_max_tokens: int = 16) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="moeforge", lifespan=lifespan)
    token_text = TokenText(engine.tokenizer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error(400, message, param=param)

    @app.exception_handler(_ClientError)
    async def _client_error(request: Request, exc: _ClientError):
        kind = "server_busy" if exc.status == 503 else "server_error" if exc.status >= 500 else "invalid_request_error"
        return error(exc.status, str(exc), kind, exc.param)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # logged with its traceback; the client gets one line
        log.exception("request failed")
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "closing" if engine.closing else "ok", "model": model_name,
                "waiting": engine.queue.qsize(), "batch_sizes": {str(k): v for k, v in engine.batch_sizes.items()}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "moeforge", "max_model_len": engine.context}]}

    # --- vLLM's tokenizer routes, for clients that tokenize with the server's tokenizer ---------
    def eos_text() -> str | None:
        tok = engine.tokenizer
        if tok.eos_id is None:
            return None
        if isinstance(tok, ByteTokenizer):
            return chr(tok.eos_id)  # byte 0: encode("\x00") == [0]
        inner = getattr(tok, "tok", None)
        return inner.id_to_token(tok.eos_id) if inner is not None else tok.decode([tok.eos_id])

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(engine.tokenizer).__name__, "eos_token": eos_text(), "bos_token": None,
                "pad_token": None, "model_max_length": engine.context, "vocab_size": engine.tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model not in (None, model_name):
            raise _ClientError(404, f"model {req.model!r} not found; this server has {model_name!r}", "model")
        try:
            ids = engine.tokenizer.encode(req.prompt)
        except Exception as e:
            raise _ClientError(400, f"prompt: cannot be tokenized ({e})", "prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        bad = next((t for t in req.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise _ClientError(400, f"tokens: token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})",
                               "tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    # --- requests -> jobs ---------------------------------------------------------------------
    def decode_call(req: RequestBase, chat: bool) -> _Call:
        if req.model not in (None, model_name):
            raise _ClientError(404, f"model {req.model!r} not found; this server has {model_name!r}", "model")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = None if req.top_p is None or req.top_p >= 1 else req.top_p
        try:
            params = SamplingParams(temperature, req.top_k or None, top_p)
        except ConfigError as e:
            raise _ClientError(400, str(e)) from None
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        if chat:
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            logprobs, top, echo = bool(req.logprobs), req.top_logprobs or 0, False
        else:
            field, max_tokens = "max_tokens", req.max_tokens
            logprobs, top, echo = req.logprobs is not None, req.logprobs or 0, bool(req.echo)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Call(chat, field, max_tokens, params, seed, req.stop_strings(), logprobs, top, echo,
                     bool(req.stream), include_usage)

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        try:
            ids = engine.tokenizer.encode(prompt)
        except Exception as e:  # a tokenizer's own failure is this request's problem only
            raise _ClientError(400, f"prompt: cannot be tokenized ({e})", "prompt") from None
        return ids or list(engine.stop_ids[:1]) or [0]

    def make_job(call: _Call, ids: list[int], on_event, media: tuple = ()) -> Job:
        room = engine.context - len(ids)
        if call.max_tokens is None:  # the default shrinks to what the context leaves
            if room < 1 and not call.echo:
                raise _ClientError(400, f"prompt: {len(ids)} tokens leave no room in the model's context of "
                                        f"{engine.context} tokens", "prompt")
            max_tokens = max(min(default_max_tokens, room), 0)
        elif call.max_tokens > room:
            raise _ClientError(400, f"{call.max_tokens_field}: prompt ({len(ids)} tokens) + {call.max_tokens_field} "
                                    f"({call.max_tokens}) exceeds the model's context of {engine.context} tokens",
                               call.max_tokens_field)
        else:
            max_tokens = call.max_tokens
        job = Job(ids, max_tokens, call.params, call.seed, call.stops, on_event, logprobs=call.logprobs,
                  top_logprobs=call.top_logprobs, prompt_logprobs=call.echo and call.logprobs, media=media)
        try:
            engine.check(job)
        except ConfigError as e:
            field = str(e).split(":", 1)[0]
            raise _ClientError(400, str(e), field) from None
        return job

    class _Running:
        """One prompt's job and the events the worker sends back to the event loop."""

        def __init__(self, call: _Call, prompt: str | list[int], media: tuple = ()):
            loop = asyncio.get_running_loop()
            self.events: asyncio.Queue = asyncio.Queue()
            self.job = make_job(call, encode(prompt), lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev),
                                media)
            self.prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(self.job.prompt_ids)

        async def collect(self) -> dict:
            """-> text, logprobs entries (prompt's first when echo), finish reason, completion tokens."""
            text, prompt_entries, entries = [], [], []
            while True:
                ev = await self.events.get()
                if ev[0] == "prompt":
                    prompt_entries = ev[1]
                elif ev[0] == "text":
                    text.append(ev[1])
                    entries += ev[2]
                elif ev[0] == "done":
                    return {"text": "".join(text), "prompt_entries": prompt_entries, "entries": entries,
                            "reason": ev[1], "n": ev[2]}
                else:
                    raise _ClientError(503 if "shutting down" in ev[1] else 500, ev[1])

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # --- logprobs in OpenAI's two shapes ----------------------------------------------------------
    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        def item(t: int, lp: float) -> dict:
            text, raw = token_text(t)
            return {"token": text, "logprob": lp, "bytes": raw}

        return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in entries], "refusal": None}

    def completion_logprobs(entries: list[TokenLogprob], base: int, k: int) -> dict:
        """Legacy shape: parallel lists; each top_logprobs dict holds the top k and the sampled token
        (up to k + 1 entries, as OpenAI documents). `base` is added to the offsets of new tokens."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(token_text(e.token)[0])
            out["token_logprobs"].append(e.logprob)
            if e.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {token_text(t)[0]: v for t, v in e.top[:k]}
                top.setdefault(token_text(e.token)[0], e.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(base + e.offset)
        return out

    # --- responses ----------------------------------------------------------------------------
    def media_prompt(segments: list[str | MediaPart]) -> tuple[list[int], tuple]:
        """Chat segments with media parts -> (prompt ids with placeholders, the job's media); a 400 naming
        the part for media the model cannot take or cannot decode."""
        encoder = engine.media_encoder
        decoded = []
        for seg in segments:
            if isinstance(seg, str):
                decoded.append(seg)
                continue
            field = "image_url" if seg.kind == "image" else "input_audio"
            if encoder is None:
                raise _ClientError(400, f"{seg.where}: {field}: this model takes text only (serve a multimodal "
                                        "checkpoint for image and audio input)", seg.where)
            try:
                decoded.append((seg.kind, encoder.decode(seg.kind, seg.data)))
            except DataError as e:
                raise _ClientError(400, f"{seg.where}: {field}: {e}", seg.where) from None
        return encoder.layout(decoded, engine.tokenizer)

    async def respond(call: _Call, prompts: list[str | list[int]], media: tuple = ()):
        if call.stream and len(prompts) > 1:
            raise _ClientError(400, "prompt: streaming takes one prompt per request", "prompt")
        if len(prompts) > engine.queue.maxsize:
            raise _ClientError(400, f"prompt: at most {engine.queue.maxsize} prompts per request", "prompt")
        running = [_Running(call, p, media) for p in prompts]  # every prompt checked before any is queued
        try:
            for r in running:
                engine.submit(r.job)
        except EngineBusy as e:
            for r in running:
                r.job.cancelled.set()
            raise _ClientError(503, str(e)) from None
        except ConfigError as e:
            for r in running:
                r.job.cancelled.set()
            raise _ClientError(400, str(e)) from None
        rid = ("chatcmpl-" if call.chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": ("chat.completion" if call.chat else "text_completion"), "created": created,
                "model": model_name}
        if call.stream:
            return StreamingResponse(stream(call, running[0], head), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(r.collect() for r in running))
        finally:
            for r in running:
                r.job.cancelled.set()
        choices = []
        for i, (r, res) in enumerate(zip(running, results)):
            if call.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": res["text"]},
                                "logprobs": chat_logprobs(res["entries"]) if call.logprobs else None,
                                "finish_reason": res["reason"]})
            else:
                text = (r.prompt_text if call.echo else "") + res["text"]
                logprobs = None
                if call.logprobs:
                    logprobs = completion_logprobs(res["prompt_entries"], 0, call.top_logprobs)
                    for key, values in completion_logprobs(res["entries"], len(r.prompt_text),
                                                           call.top_logprobs).items():
                        logprobs[key] += values
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": res["reason"]})
        n_prompt = sum(len(r.job.prompt_ids) for r in running)
        return head | {"choices": choices, "usage": usage(n_prompt, sum(res["n"] for res in results))}

    async def stream(call: _Call, r: _Running, head: dict):
        head = head | {"object": "chat.completion.chunk" if call.chat else "text_completion"}
        extra = {"usage": None} if call.include_usage else {}

        def chunk(text: str | None, entries: list, finish: str | None = None, first: bool = False, base: int = 0):
            if call.chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta,
                          "logprobs": chat_logprobs(entries) if call.logprobs and entries else None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "",
                          "logprobs": (completion_logprobs(entries, base, call.top_logprobs)
                                       if call.logprobs and entries else None), "finish_reason": finish}
            return f"data: {json.dumps(head | {'choices': [choice]} | extra)}\n\n"

        try:
            if call.chat:
                yield chunk(None, [], first=True)
            elif call.echo and not call.logprobs:
                yield chunk(r.prompt_text, [])
            while True:
                ev = await r.events.get()
                if ev[0] == "prompt":
                    yield chunk(r.prompt_text, ev[1])
                elif ev[0] == "text":
                    yield chunk(ev[1], ev[2], base=len(r.prompt_text))
                elif ev[0] == "done":
                    yield chunk(None, [], ev[1])
                    if call.include_usage:
                        last = head | {"choices": [], "usage": usage(len(r.job.prompt_ids), ev[2])}
                        yield f"data: {json.dumps(last)}\n\n"
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop decoding for it
            r.job.cancelled.set()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await respond(decode_call(req, chat=False), req.prompts())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        call = decode_call(req, chat=True)
        segments = chat_segments(req.messages)
        if len(segments) == 1:
            return await respond(call, segments)
        ids, media = await asyncio.to_thread(media_prompt, segments)  # image / WAV decoding off the event loop
        return await respond(call, [ids], media)

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          default_max_tokens: int = 16) -> None:
    """Run until Ctrl-C / SIGTERM (uvicorn's graceful shutdown, then the engine's)."""
    import uvicorn

    uvicorn.run(create_app(engine, model_name, default_max_tokens), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=30)
