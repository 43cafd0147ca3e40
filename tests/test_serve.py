"""The OpenAI-compatible server on localhost, talked to over real HTTP (httpx)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from moeforge.data import ByteTokenizer  # noqa: E402
from moeforge.inference import SamplingParams, generate  # noqa: E402
from moeforge.inference.engine import Engine, EngineBusy, Job, safe_text_end  # noqa: E402
from moeforge.inference.server import create_app  # noqa: E402
from test_inference_decode import debug_model, one_thread  # noqa: E402,F401 (autouse fixture)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(engine: Engine, model_id: str):
    """A real uvicorn server for `engine` on a free loopback port, in a thread; yields its base URL and
    stops it (the app's lifespan shutdown) on exit. Shared by the server tests."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, model_id), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = debug_model()
    engine = Engine(model, ByteTokenizer(), max_queue=8, max_batch=4)
    with running_server(engine, "debug") as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client, model
    assert not engine.worker.is_alive()  # the lifespan shutdown stopped the worker
    torch.set_num_threads(threads)


def expected_text(model, prompt: str, n: int) -> str:
    return ByteTokenizer().decode(generate(model, [list(prompt.encode())], n, stop_ids=(0,))[0])


def test_health_and_models(server):
    client, _ = server
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "debug"


def test_completion_matches_library_generation(server):
    client, model = server
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["choices"][0]["text"] == expected_text(model, "def f(x):", 8)
    assert body["usage"]["prompt_tokens"] == 9


def test_chat_and_streaming_agree(server):
    client, model = server
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == expected_text(model, "user: hi\nassistant:", 6)
    with client.stream("POST", "/v1/chat/completions", json=req | {"stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_stop_string_cuts_the_text(server):
    client, model = server
    full = expected_text(model, "abc", 12)
    stop = full[4:6]
    if not stop or "\ufffd" in full[:6]:
        pytest.skip("degenerate sample")
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("payload, status, message", [
    (b"{not json", 400, "JSON"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x" * 600, "max_tokens": 4}, 400, "context"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "not found"),
])
def test_bad_requests_are_4xx_with_a_message(server, payload, status, message):
    client, _ = server
    if isinstance(payload, bytes):
        r = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=payload)
    assert r.status_code == status
    assert message.lower() in r.json()["error"]["message"].lower()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_tokenizer_routes_round_trip(server):
    client, _ = server
    assert client.get("/tokenizer_info").json()["eos_token"] == "\x00"  # the byte tokenizer's eos
    ids = client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()["tokens"]
    assert ids == list("héllo".encode())
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "héllo"
    r = client.post("/tokenize", json={"prompt": "x", "add_special_tokens": True})
    assert r.status_code == 400 and "add_special_tokens" in r.json()["error"]["message"]
    r = client.post("/detokenize", json={"tokens": [300]})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]


def test_several_prompts_in_one_request_are_several_choices(server):
    client, model = server
    r = client.post("/v1/completions", json={"prompt": ["a", "hello"], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [expected_text(model, p, 4) for p in ("a", "hello")]
    assert r.json()["usage"]["prompt_tokens"] == 6


def test_concurrent_requests_all_answered_correctly(server):
    client, model = server
    prompts = ["a", "hello", "xyz", "The quick", "0", "moe"]

    def ask(p):
        return client.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0}).json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    for p, a in zip(prompts, answers):
        assert a["choices"][0]["text"] == expected_text(model, p, 5)


def test_full_queue_is_refused_and_close_fails_waiting_jobs():
    engine = Engine(debug_model(), ByteTokenizer(), max_queue=2)  # worker not started: jobs wait
    events = []
    jobs = [Job([1, 2], 3, SamplingParams(), 0, (), events.append) for _ in range(3)]
    engine.submit(jobs[0])
    engine.submit(jobs[1])
    with pytest.raises(EngineBusy, match="too many"):
        engine.submit(jobs[2])
    engine.close()
    assert [e[0] for e in events] == ["error", "error"]
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit(jobs[2])


def test_safe_text_end_holds_back_partial_stops_and_utf8():
    assert safe_text_end("hello wor", ("world",)) == 6
    assert safe_text_end("abc\ufffd", ()) == 3
    assert safe_text_end("abc", ("x",)) == 3


def test_serve_cli_starts_and_shuts_down_gracefully(tmp_path):
    debug_model().save_pretrained(tmp_path / "ckpt")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "moeforge.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                             "--port", str(port), "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        assert r.json() == {"status": "ok", "model": "ckpt", "waiting": 0, "batch_sizes": {}}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "Shutting down" in proc.stderr.read()
