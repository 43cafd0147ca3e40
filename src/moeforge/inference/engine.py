"""A single-model generation engine for servers: a bounded request queue and one worker thread.

Requests wait in a queue of fixed size (a full queue is refused at once, so memory stays bounded); the
worker takes the oldest, plus up to `max_batch - 1` more waiting *greedy* requests, and decodes them as
one left-padded batch with the latent KV cache (sampled requests run alone, so that a seed always gives
the same text). Text is produced incrementally: each new token re-decodes the row's tokens, holds back
an unfinished UTF-8 character and any tail that could still become a stop string, and hands the new text
to the request's `on_event` callback (for a server: `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import MoeforgeError
from .generation import stream
from .sampling import SamplingParams


class EngineBusy(MoeforgeError):
    """The request queue is full or the engine is shutting down."""


@dataclass
class Job:
    """One request. Events passed to on_event: ("text", str), then ("done", finish_reason, n_tokens)
    or ("error", message). finish_reason: "stop" (stop token or string) or "length"."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop_strings: tuple[str, ...]
    on_event: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already handed out
    finished: bool = False


def safe_text_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent now: not a trailing replacement char (an unfinished UTF-8 sequence),
    nor a tail that is the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold


class Engine:
    def __init__(self, model, tokenizer, autocast_dtype: torch.dtype | None = None, max_queue: int = 16,
                 max_batch: int = 4):
        self.model, self.tokenizer, self.autocast_dtype = model, tokenizer, autocast_dtype
        self.max_batch = max_batch
        self.context = model.config.max_position_embeddings
        self.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.closing = False
        self.worker = threading.Thread(target=self._run, name="moeforge-engine", daemon=True)

    def start(self) -> "Engine":
        if self.worker.ident is None:  # a thread starts once
            self.worker.start()
        return self

    def submit(self, job: Job) -> None:
        if self.closing:
            raise EngineBusy("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"too many requests waiting (queue of {self.queue.maxsize}); retry later") from None

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what still waits, let the running batch finish, stop the worker."""
        self.closing = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.on_event(("error", "the server is shutting down"))
        if self.worker.is_alive():
            self.queue.put(None)
            self.worker.join(timeout)

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch = [job]
            while job.params.greedy and len(batch) < self.max_batch:
                try:
                    other = self.queue.get_nowait()
                except queue.Empty:
                    break
                if other is None:  # shutting down: finish this batch first
                    self.queue.put(None)
                    break
                if not other.params.greedy:  # a sampled one waits for the next round
                    self._requeue(other)
                    break
                batch.append(other)
            try:
                self._decode(batch)
            except Exception as e:  # a bug must not kill the worker: report it to the callers
                for j in batch:
                    if not j.finished:
                        j.finished = True
                        j.on_event(("error", f"generation failed: {e}"))

    def _requeue(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            job.on_event(("error", "too many requests waiting; retry later"))

    def _decode(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled.is_set()]
        if not live:
            return
        steps = max(j.max_tokens for j in live)
        for j in live:
            if j.max_tokens == 0:
                self._finish(j, "length")
        tokens_stream = stream(self.model, [j.prompt_ids for j in live], steps, live[0].params, seed=live[0].seed,
                               stop_ids=self.stop_ids, autocast_dtype=self.autocast_dtype)
        for step_tokens in tokens_stream:
            for j, t in zip(live, step_tokens):
                if j.finished:
                    continue
                if j.cancelled.is_set():
                    j.finished = True
                    continue
                if t is None or t in self.stop_ids:
                    self._finish(j, "stop")
                    continue
                j.tokens.append(t)
                self._push_text(j)
                if not j.finished and len(j.tokens) >= j.max_tokens:
                    self._finish(j, "length")
            if all(j.finished for j in live):
                break
        tokens_stream.close()
        for j in live:
            if not j.finished:
                self._finish(j, "length")

    def _push_text(self, job: Job) -> None:
        text = self.tokenizer.decode(job.tokens)
        for s in job.stop_strings:
            at = text.find(s, max(job.sent - len(s), 0))
            if at >= 0:
                if at > job.sent:
                    job.on_event(("text", text[job.sent:at]))
                job.sent = at
                self._finish(job, "stop", flush=False)
                return
        end = safe_text_end(text, job.stop_strings)
        if end > job.sent:
            job.on_event(("text", text[job.sent:end]))
            job.sent = end

    def _finish(self, job: Job, reason: str, flush: bool = True) -> None:
        if job.finished:
            return
        if flush:  # what was held back for a stop string that never came
            text = self.tokenizer.decode(job.tokens)
            if len(text) > job.sent:
                job.on_event(("text", text[job.sent:]))
                job.sent = len(text)
        job.finished = True
        job.on_event(("done", reason, len(job.tokens)))
