"""A single-model generation engine for servers: a bounded request queue and one worker thread.

Requests wait in a queue of fixed size (a full queue is refused at once, so memory stays bounded); the
worker takes the oldest plus up to `max_batch - 1` more waiting requests and decodes them as one
left-padded batch with the latent KV cache. Each row keeps its own sampling parameters, seed (its own
generator) and max_tokens, so a request gives the same tokens alone or batched: greedy and seeded
sampling alike. Requests are checked (`Engine.check`) before they are queued and again by the worker, and
every per-request step (sampling, text, callbacks) fails only its own request; if a batched forward
itself fails, the requests that have produced nothing yet are retried one by one.

Text is produced incrementally: each new token re-decodes the row's tokens, holds back an unfinished
UTF-8 character and any tail that could still become a stop string, and hands the new text (with the
log-probabilities of the tokens it covers, when asked) to the request's `on_event` callback (for a
server: `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError, MoeforgeError
from .absorbed import forward_cached
from .generation import cache_dtype, left_pad
from .kv_cache import LatentKVCache
from .sampling import SamplingParams, distribution

SEED_MIN, SEED_END = -(2**63), 2**64  # what torch.Generator.manual_seed accepts
MAX_TOP_LOGPROBS = 20


class EngineBusy(MoeforgeError):
    """The request queue is full or the engine is shutting down."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of its logits, before temperature, top-k
    and top-p), the `top` most likely tokens at that position as (id, logprob), best first, and the
    character offset of the token's text (in the prompt for prompt tokens, in the new text otherwise).
    logprob is None for a prompt's first token: nothing predicts it."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    offset: int = 0


@dataclass
class Job:
    """One request. Events passed to on_event: ("prompt", [TokenLogprob]) first when prompt_logprobs,
    then ("text", str, [TokenLogprob]) (the list is empty unless logprobs), then ("done", finish_reason,
    n_tokens) or ("error", message). finish_reason: "stop" (stop token or string) or "length"."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop_strings: tuple[str, ...]
    on_event: Callable[[tuple], None]
    logprobs: bool = False  # the sampled tokens' log-probabilities ...
    top_logprobs: int = 0  # ... and this many alternatives per position
    prompt_logprobs: bool = False  # the prompt tokens' log-probabilities (OpenAI's `echo` + `logprobs`)
    # (start, kind, item): an image or clip whose encoder vectors replace prompt_ids[start:start + n]
    # (placeholders); needs an engine with a media_encoder.
    media: tuple[tuple[int, str, object], ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decode(tokens)
    offsets: list[int] = field(default_factory=list)  # where each token's text starts in `text`
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs whose text is not sent yet
    sent: int = 0  # characters of text already handed out
    emitted: bool = False  # any event handed out (a failed batch retries only jobs without)
    finished: bool = False

    def restart(self) -> None:
        self.tokens, self.text, self.offsets, self.pending, self.sent = [], "", [], [], 0


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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int, offsets: list[int]) -> list[TokenLogprob]:
    """logits [N, V] predicting targets [N] -> their log-probabilities and the top-k alternatives."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
    if k:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, c, top, o) for t, c, top, o in zip(targets.tolist(), chosen, tops, offsets)]


def char_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in decode(ids) (prefix decodes: a token's text can depend on its
    neighbours)."""
    return [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


class Engine:
    def __init__(self, model, tokenizer, autocast_dtype: torch.dtype | None = None, max_queue: int = 16,
                 max_batch: int = 4, prefill_chunk: int = 512, mode: str = "auto", media_encoder=None):
        """media_encoder: (kind, item) -> vectors [n, hidden] for jobs with media (a multimodal
        checkpoint's encoders, `moeforge.multimodal.serving.MediaEncoder`); None: text only."""
        self.model, self.tokenizer, self.autocast_dtype = model, tokenizer, autocast_dtype
        self.media_encoder = media_encoder
        self.max_batch, self.prefill_chunk, self.mode = max_batch, prefill_chunk, mode
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.closing = False
        # Held by the worker while it forms and decodes a batch; take it to use the model from another
        # thread (requests arriving meanwhile wait in the queue and join the next batch).
        self.model_lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()  # batches decoded, by number of requests
        self.worker = threading.Thread(target=self._run, name="moeforge-engine", daemon=True)

    def start(self) -> "Engine":
        if self.worker.ident is None:  # a thread starts once
            self.worker.start()
        return self

    def check(self, job: Job) -> None:
        """ConfigError naming the field for a job this engine cannot run."""
        if not job.prompt_ids:
            raise ConfigError("prompt: needs at least one token")
        bad = next((t for t in job.prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ConfigError(f"prompt: token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        if job.max_tokens < 0:
            raise ConfigError(f"max_tokens: must be >= 0, got {job.max_tokens}")
        if len(job.prompt_ids) + job.max_tokens > self.context:
            raise ConfigError(f"max_tokens: prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_tokens}) "
                              f"exceeds the model's context of {self.context} tokens")
        if not SEED_MIN <= job.seed < SEED_END:
            raise ConfigError(f"seed: must be in [-2**63, 2**64), got {job.seed}")
        if not 0 <= job.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs: must be in 0..{MAX_TOP_LOGPROBS}, got {job.top_logprobs}")
        if job.media and self.media_encoder is None:
            raise ConfigError(f"messages: this model takes text only ({job.media[0][1]} given; serve a "
                              "multimodal checkpoint)")

    def submit(self, job: Job) -> None:
        if self.closing:
            raise EngineBusy("the server is shutting down")
        self.check(job)
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
                self._fail(job, "the server is shutting down")
        if self.worker.is_alive():
            self.queue.put(None)
            self.worker.join(timeout)

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self.model_lock:
                batch = [job]
                while len(batch) < self.max_batch:
                    try:
                        other = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if other is None:  # shutting down: finish this batch first
                        self.queue.put(None)
                        break
                    batch.append(other)
                self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        ready = []
        for j in batch:
            try:
                self.check(j)
            except ConfigError as e:
                self._fail(j, str(e))
                continue
            if j.cancelled.is_set():
                j.finished = True
            else:
                ready.append(j)
        if not ready:
            return
        try:
            self._decode(ready)
        except Exception as e:  # a bug must not kill the worker, nor fail requests it could still serve
            for j in ready:
                if j.finished:
                    continue
                if len(ready) > 1 and not j.emitted:
                    j.restart()
                    self._run_alone(j)
                else:
                    self._fail(j, f"generation failed: {e}")

    def _run_alone(self, job: Job) -> None:
        try:
            self._decode([job])
        except Exception as e:
            self._fail(job, f"generation failed: {e}")

    @torch.no_grad()
    def _decode(self, jobs: list[Job]) -> None:
        self.batch_sizes[len(jobs)] += 1
        model = self.model
        device = next(model.parameters()).device
        ids, mask = left_pad([j.prompt_ids for j in jobs], device)
        B, T = ids.shape
        steps = max(j.max_tokens for j in jobs)
        if steps == 0 and not any(j.prompt_logprobs for j in jobs):
            for j in jobs:
                self._finish(j, "length")
            return
        # Rows are left-padded, so the cache may hold more slots than the context; RoPE positions count
        # only a row's real tokens, which `check` keeps within the context.
        cache = LatentKVCache.for_model(model.config, B, T + steps, dtype=cache_dtype(model, self.autocast_dtype),
                                        device=device)
        generators = [torch.Generator(device=device).manual_seed(j.seed) for j in jobs]
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                logits = self._prefill(jobs, ids, mask, cache)
                for step in range(steps):
                    tokens = logits.argmax(-1)
                    for b, j in enumerate(jobs):
                        if j.finished:
                            continue
                        if j.cancelled.is_set() or step >= j.max_tokens:
                            self._finish(j, "length", notify=not j.cancelled.is_set())
                            continue
                        try:
                            if not j.params.greedy:
                                probs = distribution(logits[b:b + 1], j.params)
                                tokens[b] = torch.multinomial(probs, 1, generator=generators[b])[0, 0]
                            entry = (token_logprobs(logits[b:b + 1], tokens[b:b + 1], j.top_logprobs, [len(j.text)])[0]
                                     if j.logprobs else None)
                        except Exception as e:
                            self._fail(j, f"sampling failed: {e}")
                            continue
                        self._accept(j, int(tokens[b]), entry)
                    if step == steps - 1 or all(j.finished for j in jobs):
                        break
                    # A finished row's token is padding: it must not advance that row's RoPE position.
                    running = torch.tensor([[not j.finished] for j in jobs], device=device)
                    logits = forward_cached(model, tokens[:, None], cache, running, self.mode)[0][:, -1]
        finally:
            model.train(was_training)
        for j in jobs:
            self._finish(j, "length")

    def _prefill(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """Prefill in chunks; hand out prompt logprobs where asked. Returns the last position's logits [B, V]."""
        T = ids.shape[1]
        want = {b: [TokenLogprob(j.prompt_ids[0], None)] for b, j in enumerate(jobs) if j.prompt_logprobs}
        offsets = {b: char_offsets(self.tokenizer, jobs[b].prompt_ids) for b in want}
        embeds = self._embed_media(jobs, ids) if any(j.media for j in jobs) else None
        for i in range(0, T, self.prefill_chunk):
            media = {} if embeds is None else {"embeds": embeds[:, i:i + self.prefill_chunk]}
            logits, _ = forward_cached(self.model, ids[:, i:i + self.prefill_chunk], cache,
                                       mask[:, i:i + self.prefill_chunk], self.mode, **media)
            for b in want:  # logits at padded position q - 1 predict the token at q
                first = T - len(jobs[b].prompt_ids)
                lo, hi = max(first + 1, i + 1), min(i + logits.shape[1], T - 1)
                if lo <= hi:
                    want[b] += token_logprobs(logits[b, lo - 1 - i:hi - i], ids[b, lo:hi + 1], jobs[b].top_logprobs,
                                              offsets[b][lo - first:hi + 1 - first])
        for b, entries in want.items():
            self._emit(jobs[b], ("prompt", entries))
        return logits[:, -1]

    def _embed_media(self, jobs: list[Job], ids: torch.Tensor) -> torch.Tensor:
        """The prompts' token embeddings with each job's media vectors over its placeholders (rows are
        left-padded: a row's prompt starts at T - len(prompt_ids))."""
        h = self.model.embed_tokens(ids)
        T = ids.shape[1]
        for b, j in enumerate(jobs):
            for start, kind, item in j.media:
                vectors = self.media_encoder(kind, item).to(h.dtype)
                at = T - len(j.prompt_ids) + start
                h[b, at:at + vectors.shape[0]] = vectors
        return h

    # --- text -----------------------------------------------------------------------------------
    def _accept(self, job: Job, token: int, entry: TokenLogprob | None) -> None:
        if token in self.stop_ids:
            self._finish(job, "stop")
            return
        job.offsets.append(len(job.text))
        job.tokens.append(token)
        if entry is not None:
            job.pending.append(entry)
        try:
            job.text = self.tokenizer.decode(job.tokens)
        except Exception as e:
            self._fail(job, f"decoding failed: {e}")
            return
        self._push_text(job)
        if not job.finished and len(job.tokens) >= job.max_tokens:
            self._finish(job, "length")

    def _send(self, job: Job, end: int) -> None:
        """Hand out text up to `end` with the logprobs of the tokens that start before it."""
        covered = bisect.bisect_left(job.offsets, end) - (len(job.offsets) - len(job.pending)) if job.logprobs else 0
        entries, job.pending = job.pending[:max(covered, 0)], job.pending[max(covered, 0):]
        if end > job.sent or entries:
            self._emit(job, ("text", job.text[job.sent:end], entries))
            job.sent = max(job.sent, end)

    def _push_text(self, job: Job) -> None:
        for s in job.stop_strings:
            at = job.text.find(s, max(job.sent - len(s), 0))
            if at >= 0:
                self._send(job, at)
                job.pending = []
                self._finish(job, "stop", flush=False)
                return
        self._send(job, safe_text_end(job.text, job.stop_strings))

    def _finish(self, job: Job, reason: str, flush: bool = True, notify: bool = True) -> None:
        if job.finished:
            return
        if flush and notify:  # what was held back for a stop string that never came
            self._send(job, len(job.text))
            if job.pending:
                self._emit(job, ("text", "", job.pending))
                job.pending = []
        job.finished = True
        if notify:
            self._emit(job, ("done", reason, len(job.tokens)))

    def _fail(self, job: Job, message: str) -> None:
        if not job.finished:
            job.finished = True
            self._emit(job, ("error", message))

    def _emit(self, job: Job, event: tuple) -> None:
        """A broken callback ends only its own job."""
        job.emitted = True
        try:
            job.on_event(event)
        except Exception:
            job.finished = True
            job.cancelled.set()
