"""The server against the official `openai` client on loopback: fields honoured or refused with a 4xx
naming them, batches of several requests giving each request's unbatched output, logprobs equal to the
model's own log_softmax, usage in streams, and prompt logprobs (`echo`) as lm-evaluation-harness asks."""

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from moeforge.data import ByteTokenizer  # noqa: E402
from moeforge.inference import SamplingParams, generate  # noqa: E402
from moeforge.inference.engine import Engine, Job  # noqa: E402
from test_inference_decode import debug_model, one_thread  # noqa: E402,F401 (autouse fixture)
from test_serve import running_server  # noqa: E402

MAX_BATCH = 4


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = debug_model()
    engine = Engine(model, ByteTokenizer(), max_queue=16, max_batch=MAX_BATCH)
    with running_server(engine, "debug") as base, httpx.Client(base_url=base, timeout=120) as raw:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, raw, engine, model
        client.close()
    torch.set_num_threads(threads)


@contextmanager
def one_batch(engine: Engine, n: int):
    """Hold the worker while `n` requests arrive, so that it decodes them as one batch; yields a pool to
    send them with. The worker takes the first request, then waits for the model lock."""
    before = engine.batch_sizes[n]
    with ThreadPoolExecutor(32) as pool:
        with engine.model_lock:
            holder = {"pool": pool}
            yield holder
            for _ in range(1200):
                if engine.queue.qsize() >= n - 1:
                    break
                time.sleep(0.05)
            assert engine.queue.qsize() == n - 1
    assert engine.batch_sizes[n] == before + 1, dict(engine.batch_sizes)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own full-sequence logits: row i predicts token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def chat_token_ids(choice) -> list[int]:
    return [item.bytes[0] for item in choice.logprobs.content]  # byte tokenizer: one byte per token


def text(model, prompt: str, n: int, params=SamplingParams(), seed=0) -> str:
    return ByteTokenizer().decode(generate(model, [list(prompt.encode())], n, params, seed=seed, stop_ids=(0,))[0])


def test_models_lists_the_served_id(served):
    client, _, engine, _ = served
    (m,) = client.models.list().data
    assert m.id == "debug" and m.owned_by == "moeforge"


BAD = [  # (route, request, field named in the 4xx)
    ("completions", {"prompt": "x", "seed": 2**64, "temperature": 0}, "seed"),  # greedy: batched with the good
    ("completions", {"prompt": "x", "n": 2}, "n"),
    ("completions", {"prompt": "x", "temperature": 1e-40}, "temperature"),  # would be NaN probabilities
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": [[1, 2, 300]]}, "prompt"),
    ("completions", {"prompt": "x", "extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {}}}}, "response_format"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 600}, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
]


def test_bad_fields_are_4xx_naming_the_field_and_good_requests_batched_with_them_succeed(served):
    client, raw, engine, model = served
    good = [("def f(x):", 6), ("hello", 5)]

    def ask_bad(case):
        route, req, _ = case
        try:
            if route == "completions":
                client.completions.create(model="debug", max_tokens=3, **req)
            else:
                client.chat.completions.create(model="debug", **req)
        except openai.BadRequestError as e:
            return e.status_code, e.body["message"]
        return 200, "accepted"

    def ask_good(p):
        return client.completions.create(model="debug", prompt=p[0], max_tokens=p[1], temperature=0)

    with one_batch(engine, len(good)) as b:
        good_answers = [b["pool"].submit(ask_good, p) for p in good]
        bad_answers = [b["pool"].submit(ask_bad, case) for case in BAD]
        # A lone surrogate (valid JSON, not encodable text): the client cannot even send it, so raw bytes.
        surrogate = raw.post("/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
                             headers={"content-type": "application/json"})
        for case, answer in zip(BAD, bad_answers):
            status, message = answer.result()
            assert status == 400 and case[2] in message, (case, message)
        assert surrogate.status_code == 400 and "prompt" in surrogate.json()["error"]["message"]
    for (prompt, n), answer in zip(good, good_answers):
        assert answer.result().choices[0].text == text(model, prompt, n)


def test_a_batch_gives_each_request_its_unbatched_output(served):
    """Greedy and seeded temperature-1.0 requests in one batch, with a long prompt next to a long
    completion (longest prompt + largest max_tokens > context: each is valid alone, so also together)."""
    client, _, engine, model = served
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 11  # 495 tokens
    requests = [
        dict(prompt=long_prompt, max_tokens=4, temperature=0, logprobs=2),
        dict(prompt="a", max_tokens=30, temperature=0, logprobs=2),
        dict(prompt="def f(x):", max_tokens=12, temperature=1.0, seed=7, logprobs=2),
        dict(prompt="hello", max_tokens=12, seed=2**63 + 5, logprobs=2),  # OpenAI's default temperature: 1
    ]
    assert len(long_prompt) + 30 > engine.context

    def ask(req):
        return client.completions.create(model="debug", **req).choices[0]

    with one_batch(engine, len(requests)) as b:
        batched = [b["pool"].submit(ask, r) for r in requests]
    batched = [f.result() for f in batched]
    for req, got in zip(requests, batched):
        alone = ask(req)  # the worker is idle: a batch of one
        assert got.text == alone.text and got.finish_reason == alone.finish_reason
        assert got.logprobs.tokens == alone.logprobs.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs.token_logprobs),
                                   torch.tensor(alone.logprobs.token_logprobs), rtol=0, atol=1e-4)
        params = SamplingParams(req.get("temperature", 1.0))
        assert got.text == text(model, req["prompt"], req["max_tokens"], params, req.get("seed", 0))
    assert len(batched[1].text) > 0


def test_chat_logprobs_equal_the_models_log_softmax(served):
    client, _, _, model = served
    messages = [{"role": "user", "content": "hi"}]
    for sampling in (dict(temperature=0), dict(seed=3)):  # greedy, and OpenAI's default temperature 1
        choice = client.chat.completions.create(model="debug", messages=messages, max_completion_tokens=8,
                                                logprobs=True, top_logprobs=3, **sampling).choices[0]
        prompt = list(b"user: hi\nassistant:")
        new = chat_token_ids(choice)
        assert ByteTokenizer().decode(new) == choice.message.content
        ref = reference_logprobs(model, prompt + new)
        for i, item in enumerate(choice.logprobs.content):
            row = ref[len(prompt) - 1 + i]
            assert item.logprob == pytest.approx(row[new[i]].item(), abs=1e-4)
            values, ids = row.topk(3)
            assert [t.bytes for t in item.top_logprobs] == [[int(t)] for t in ids]
            assert [t.logprob for t in item.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


def test_completion_logprobs_shape_and_values(served):
    client, _, _, model = served
    choice = client.completions.create(model="debug", prompt="abc", max_tokens=6, temperature=0,
                                       logprobs=2).choices[0]
    lp = choice.logprobs
    ids = [ord(t) if len(t) == 1 else int(t[-2:], 16) for t in lp.tokens]
    ref = reference_logprobs(model, list(b"abc") + ids)
    assert lp.token_logprobs == pytest.approx([ref[2 + i, t].item() for i, t in enumerate(ids)], abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
               for i, top in enumerate(lp.top_logprobs))  # greedy: the sampled token is the top one
    assert lp.text_offset[0] == 3


def test_echo_prompt_logprobs_as_lm_eval_asks(served):
    """lm-evaluation-harness's `local-completions` loglikelihood: token ids, echo, logprobs=1, max_tokens
    0 or 1; the prompt tokens' logprobs must be the model's own."""
    client, _, _, model = served
    ids = list(b"The cat sat on the mat.")
    ref = reference_logprobs(model, ids)
    for max_tokens in (0, 1):
        choice = client.completions.create(model="debug", prompt=[ids], max_tokens=max_tokens, echo=True,
                                           logprobs=1, temperature=0).choices[0]
        lp = choice.logprobs
        assert choice.text.startswith("The cat sat on the mat.")
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        greedy = [lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6 for i in range(1, len(ids))]
        assert greedy == [ref[i - 1].argmax().item() == ids[i] for i in range(1, len(ids))]
        assert lp.text_offset[:3] == [0, 1, 2]


def test_streams_report_usage_when_asked(served):
    client, _, _, _ = served
    chat = list(client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "hi"}],
                                               max_completion_tokens=5, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.prompt_tokens == len("user: hi\nassistant:")
    once = client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0)
    assert chat[-1].usage == once.usage
    assert "".join(c.choices[0].delta.content or "" for c in chat[:-1]) == once.choices[0].message.content
    assert all(c.usage is None for c in chat[:-1])
    plain = list(client.completions.create(model="debug", prompt="abc", max_tokens=4, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert plain[-1].usage.prompt_tokens == 3 and plain[-1].usage.completion_tokens <= 4
    without = list(client.completions.create(model="debug", prompt="abc", max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in without)


def test_developer_role_and_text_parts_are_honoured(served):
    client, _, _, model = served

    def chat(messages):
        r = client.chat.completions.create(model="debug", messages=messages, max_completion_tokens=6, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens

    as_system = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    as_developer = chat([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    parts = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    as_parts = chat([{"role": "developer", "content": parts},
                     {"role": "user", "content": [{"type": "text", "text": "hi there"}]}])
    prompt = "system: be brief\nuser: hi there\nassistant:"
    assert as_system == as_developer == as_parts == (text(model, prompt, 6), len(prompt))


def test_max_completion_tokens_is_honoured(served):
    client, _, _, _ = served
    r = client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 3


def test_a_failing_request_fails_alone_in_the_batch_loop(monkeypatch):
    """Past the server's checks: a job the worker must refuse (token id outside the vocabulary), one whose
    callback raises, and a batched forward that fails (its requests are retried alone) hurt no other."""
    import moeforge.inference.engine as engine_module

    model = debug_model()
    engine = Engine(model, ByteTokenizer(), max_batch=4).start()
    events = {k: [] for k in ("good", "poison", "broken", "other")}

    def broken_callback(ev):
        raise RuntimeError("client went away badly")

    jobs = {"good": Job(list(b"abc"), 5, SamplingParams(), 0, (), events["good"].append),
            "poison": Job([1, 9999], 5, SamplingParams(), 0, (), events["poison"].append),
            "broken": Job(list(b"xy"), 5, SamplingParams(), 0, (), broken_callback),
            "other": Job(list(b"hello"), 5, SamplingParams(1.0), 4, (), events["other"].append)}
    real = engine_module.forward_cached
    fail_batched = {"on": False}

    def flaky_forward(model, ids, cache, mask=None, mode="auto"):
        if fail_batched["on"] and ids.shape[0] > 1:
            raise RuntimeError("simulated kernel failure")
        return real(model, ids, cache, mask, mode)

    monkeypatch.setattr(engine_module, "forward_cached", flaky_forward)
    try:
        for fail in (False, True):
            fail_batched["on"] = fail
            for ev in events.values():
                ev.clear()
            with engine.model_lock:  # all four in one batch
                for job in jobs.values():
                    job.finished, job.emitted = False, False
                    job.cancelled.clear()
                    job.restart()
                    engine.queue.put(job)  # past `submit`'s check, as a bug would let through
                while engine.queue.qsize() > 3:
                    time.sleep(0.01)
            deadline = time.time() + 60
            while not all(events[k] and events[k][-1][0] in ("done", "error") for k in ("good", "poison", "other")):
                assert time.time() < deadline
                time.sleep(0.01)
            assert events["poison"] == [("error", "prompt: token id 9999 is outside the model's vocabulary (0..255)")]
            good = "".join(e[1] for e in events["good"] if e[0] == "text")
            other = "".join(e[1] for e in events["other"] if e[0] == "text")
            assert good == text(model, "abc", 5) and events["good"][-1][0] == "done"
            assert other == text(model, "hello", 5, SamplingParams(1.0), 4)
        assert engine.batch_sizes[3] == 2 and engine.batch_sizes[1] >= 3, dict(engine.batch_sizes)  # then one by one
    finally:
        engine.close()


def test_lm_eval_local_completions_loglikelihoods_equal_the_models(served):
    """lm-evaluation-harness's own `local-completions` model against the server: it detects the server's
    tokenizer routes (remote backend), sends token ids with echo + logprobs, and its loglikelihoods and
    is-greedy flags must be the model's own."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    client, raw, _, model = served
    lm = get_model("local-completions")(base_url=str(raw.base_url) + "/v1/completions", model="debug",
                                        max_retries=1, max_length=256)
    assert lm.tokenizer_backend == "remote"
    pairs = [("The cat", " sat on the mat."), ("def f(x):", " return x")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx, cont = list(context.encode()), list(continuation.encode())
        ref = reference_logprobs(model, ctx + cont)
        rows = ref[len(ctx) - 1:-1]
        assert logprob == pytest.approx(rows.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-3)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
