"""The request bodies of the OpenAI-compatible server, as pydantic models: what each field may be.

Unknown fields are refused (a client that sets one expects it to act); fields that change the result but
that the server does not implement (n > 1, penalties, logit_bias, tools, JSON response formats, ...) are
accepted only at their neutral value; fields that are OpenAI's bookkeeping (user, metadata, ...) are
accepted and have no effect. Every refusal names its field: the server turns pydantic's errors into one
400 message "field: problem" (`validation_message`).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .chat_template import render as render_chat
from .engine import MAX_TOP_LOGPROBS, SEED_END, SEED_MIN

MAX_STOP_STRINGS = 4
MIN_TEMPERATURE = 1e-6
MAX_MEDIA_BYTES = 8 * 2**20  # one image or clip, after base64 decoding
AUDIO_FORMATS = ("wav",)


def _unicode(s: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: lone surrogate {s[e.start]!r} at character {e.start}") from None
    return s


def _neutral(name: str, value: Any, allowed: tuple) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name}: only {' or '.join(map(repr, allowed))} is supported by this server, got {value!r}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class RequestBase(BaseModel):
    """The fields completions and chat share."""

    # Unknown fields are refused, not ignored: a client that sets one expects it to act.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, description="default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="an extension (as vLLM's); 0 or absent = off")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    # Accepted at their neutral value only: anything else would change the result.
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted and without effect on the output (bookkeeping on OpenAI's side).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and 0 < v < MIN_TEMPERATURE:  # logits / T overflows float32 long before 1e-37
            raise ValueError(f"0 (greedy) or at least {MIN_TEMPERATURE}, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or ())
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty strings")
        for s in stops:
            _unicode(s)
        return v

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self):
        _neutral("n", self.n, (1,))
        _neutral("presence_penalty", self.presence_penalty, (0,))
        _neutral("frequency_penalty", self.frequency_penalty, (0,))
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(RequestBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list")
        for s in [v] if isinstance(v, str) else v:
            if isinstance(s, str):
                _unicode(s)
            elif isinstance(s, list) and not s:
                raise ValueError("an empty list of token ids")
        return v

    @model_validator(mode="after")
    def _refuse_completion_fields(self):
        _neutral("best_of", self.best_of, (1,))
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of those -> a list of prompts."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


@dataclass(frozen=True)
class MediaPart:
    """An image_url or input_audio content part, base64-decoded (what the bytes hold is checked by the
    model's media decoder). `where` names the part for error messages (messages.M.content.P)."""

    kind: Literal["image", "audio"]
    data: bytes
    where: str = ""


def _base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: must be a base64 string")
    if len(text) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise ValueError(f"{what}: too large (more than {MAX_MEDIA_BYTES // 2**20} MB)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None
    if not data:
        raise ValueError(f"{what}: empty")
    return data


def _keys(part: dict, i: int, allowed: set[str]) -> None:
    if set(part) - allowed:
        raise ValueError(f"part {i}: unsupported keys {sorted(set(part) - allowed)}")


def _image_part(part: dict, i: int) -> MediaPart:
    _keys(part, i, {"type", "image_url"})
    spec = part.get("image_url")
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        raise ValueError(f"part {i}: image_url must be {{'url': 'data:image/png;base64,...'}}")
    _keys(spec, i, {"url", "detail"})
    _neutral(f"part {i}: image_url.detail", spec.get("detail"), ("auto",))
    url = spec["url"]
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a URL without a scheme"
        raise ValueError(f"part {i}: image_url.url: only inline data URLs (data:image/png;base64,...) are "
                         f"supported, not {scheme!r} (the server fetches nothing)")
    head, _, payload = url[5:].partition(",")
    if not head.endswith(";base64") or not head.startswith("image/"):
        raise ValueError(f"part {i}: image_url.url: expected data:image/<format>;base64,<data>, got "
                         f"data:{head[:40]},...")
    return MediaPart("image", _base64(payload, f"part {i}: image_url.url"), str(i))


def _audio_part(part: dict, i: int) -> MediaPart:
    _keys(part, i, {"type", "input_audio"})
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or "data" not in spec or "format" not in spec:
        raise ValueError(f"part {i}: input_audio must be {{'data': <base64>, 'format': 'wav'}}")
    _keys(spec, i, {"data", "format"})
    if spec["format"] not in AUDIO_FORMATS:
        raise ValueError(f"part {i}: input_audio.format: only {' or '.join(map(repr, AUDIO_FORMATS))} is "
                         f"supported, got {spec['format']!r}")
    return MediaPart("audio", _base64(spec["data"], f"part {i}: input_audio.data"), str(i))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["developer", "system", "user", "assistant"]
    content: str | list  # a string, or text (str) and MediaPart pieces in order

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        """OpenAI's list of content parts: text parts are concatenated; image_url (inline data URLs) and
        input_audio (wav) parts are decoded from base64 and kept in place; other kinds are refused.
        Text only -> one string."""
        if not isinstance(v, list):
            return v
        pieces: list = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "image_url":
                pieces.append(_image_part(part, i))
            elif kind == "input_audio":
                pieces.append(_audio_part(part, i))
            elif kind == "text" and isinstance(part.get("text"), str):
                _keys(part, i, {"type", "text"})
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += part["text"]
                else:
                    pieces.append(part["text"])
            else:
                raise ValueError(f"part {i}: only text, image_url and input_audio parts are supported, got {kind!r}")
        if all(isinstance(p, str) for p in pieces):
            return "".join(pieces)
        return pieces

    @field_validator("content")
    @classmethod
    def _content_unicode(cls, v):
        for piece in [v] if isinstance(v, str) else v:
            if isinstance(piece, str):
                _unicode(piece)
        return v


class ChatRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # no effect without tools
    response_format: dict | None = None

    @model_validator(mode="after")
    def _refuse_chat_fields(self):
        if self.tools:
            raise ValueError("tools: not supported by this server")
        _neutral("tool_choice", self.tool_choice, ("none", "auto"))
        if self.response_format is not None and self.response_format != {"type": "text"}:
            raise ValueError(f"response_format: only {{'type': 'text'}} is supported, got {self.response_format!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens (send one)")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize (lm-evaluation-harness's `remote` tokenizer backend uses it)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_unicode(cls, v):
        return _unicode(v)

    @field_validator("add_special_tokens")
    @classmethod
    def _no_special(cls, v):
        if v:
            raise ValueError("this server's tokenizers add no special tokens; send false")
        return v


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def chat_segments(messages: list[ChatMessage]) -> list[str | MediaPart]:
    """The messages in the chat template (`chat_template.render`): 'role: content' lines, then
    'assistant:'; media parts stay where they were in their message. Each MediaPart's `where` becomes
    'messages.M.content.P'."""
    turns = []
    for m, msg in enumerate(messages):
        pieces = [msg.content] if isinstance(msg.content, str) else msg.content
        turns.append((msg.role, [p if isinstance(p, str) else
                                 MediaPart(p.kind, p.data, f"messages.{m}.content.{p.where}") for p in pieces]))
    return render_chat(turns)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The template of `chat_segments` for text-only messages."""
    segments = chat_segments(messages)
    if len(segments) != 1:
        raise ValueError("chat_prompt: the messages hold media; use chat_segments")
    return segments[0]


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors (`exc.errors()`) as 'field: problem' (one per field; union branches folded) and
    the first field named."""
    found: dict[str, str] = {}
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"
               and not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "not supported by this server"
        if e.get("type") == "json_invalid":
            loc = []
        if ": " in msg and not loc:  # a model-level check names its own field
            where, msg = msg.split(": ", 1)
            loc = [where]
        found.setdefault(".".join(loc), msg)
    parts = [f"{where}: {msg}" if where else msg for where, msg in found.items()]
    return "; ".join(parts) or "invalid request", next(iter(found), None) or None
