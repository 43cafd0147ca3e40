"""The server's image_url / input_audio content parts against the official `openai` client on loopback:
a tiny random multimodal model served gives what `moeforge generate`'s media path gives for the same
image or clip and prompt, first-token logprobs equal the full (uncached) forward's log_softmax, a media
request batched with a text request leaves both unchanged, and bad media is a 400 naming the part and
the problem."""

import base64
import io
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from moeforge.data import ByteTokenizer  # noqa: E402
from moeforge.inference.engine import Engine  # noqa: E402
from moeforge.multimodal import media  # noqa: E402
from moeforge.multimodal.data import render_image  # noqa: E402
from moeforge.multimodal.generation import answer_segments, segments_batch  # noqa: E402
from moeforge.multimodal.serving import MediaEncoder  # noqa: E402
from test_inference_decode import debug_model, one_thread  # noqa: E402,F401 (autouse fixture)
from test_multimodal import CFG, tiny_lm  # noqa: E402
from test_serve import running_server  # noqa: E402

TOK = ByteTokenizer()


@contextmanager
def serving(engine: Engine):
    with running_server(engine, "mm") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            yield client
        finally:
            client.close()


@pytest.fixture(scope="module")
def served():
    model = tiny_lm(seed=3)
    with torch.no_grad():  # sharper attention than the init, so the media visibly steer the output
        for layer in model.lm.layers:
            layer.self_attn.kv_b_proj.weight.mul_(10)
            layer.self_attn.q_b_proj.weight.mul_(10)
    engine = Engine(model.lm, TOK, max_queue=8, max_batch=4, media_encoder=MediaEncoder(model))
    with serving(engine) as client:
        yield client, model, engine


def png(seed: int, shape="circle", colour="red") -> bytes:
    buf = io.BytesIO()
    render_image(shape, colour, "top left", np.random.default_rng(seed), 48).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * 22050)) / 22050  # not 16 kHz: the server resamples as generate does
    return media.encode_wav((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate=22050)


def image_part(data: bytes, mime="image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def audio_part(data: bytes, fmt="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def chat(client, parts, n=8, **kw):
    return client.chat.completions.create(model="mm", messages=[{"role": "user", "content": parts}],
                                          max_tokens=n, temperature=0, **kw).choices[0]


def test_served_media_answers_equal_generate_and_the_full_forward(served):
    client, model, _ = served
    cases = [("image", png(1), media.decode_image(png(1), CFG.image_size), image_part(png(1))),
             ("image", png(2, "square", "blue"), media.decode_image(png(2, "square", "blue"), CFG.image_size),
              image_part(png(2, "square", "blue"))),
             ("audio", wav(0.6), media.decode_wav(wav(0.6)), audio_part(wav(0.6))),
             ("audio", wav(0.4, 900), media.decode_wav(wav(0.4, 900)), audio_part(wav(0.4, 900)))]
    first_logprobs = []
    for kind, _, item, part in cases:
        got = chat(client, [{"type": "text", "text": "Look: "}, part, {"type": "text", "text": " What is it?"}],
                   n=6, logprobs=True)
        segments = ["user: Look: ", (kind, item), " What is it?\nassistant:"]
        assert got.message.content == answer_segments(model, segments, TOK, 6)
        with torch.no_grad():  # the first token's logprob against the whole sequence run without a cache
            ref = model.media_logits(segments_batch(segments, CFG, TOK))[0, -1].log_softmax(-1)
        first = got.logprobs.content[0]
        assert abs(first.logprob - ref[first.bytes[0]].item()) < 1e-4
        first_logprobs.append(first.logprob)
    # the media reach the output: another image (clip) gives another first-token distribution
    assert abs(first_logprobs[0] - first_logprobs[1]) > 1e-3 and abs(first_logprobs[2] - first_logprobs[3]) > 1e-3


def test_media_and_text_requests_batched_give_their_unbatched_answers(served):
    client, model, engine = served
    from concurrent.futures import ThreadPoolExecutor

    parts = [image_part(png(4, "triangle", "green")), {"type": "text", "text": "Colour?"}]
    alone_media, alone_text = chat(client, parts).message.content, chat(client, "hello").message.content
    with ThreadPoolExecutor(2) as pool:
        with engine.model_lock:  # both wait in the queue, then decode as one batch
            futures = [pool.submit(chat, client, parts), pool.submit(chat, client, "hello")]
            for _ in range(400):
                if engine.queue.qsize() >= 1:
                    break
                time.sleep(0.05)
            time.sleep(0.2)
        batched = [f.result().message.content for f in futures]
    assert batched == [alone_media, alone_text]


def too_big_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4200, 4200)).save(buf, "PNG")  # 17.6 Mpx, a few KB compressed
    return buf.getvalue()


BAD_MEDIA = [  # (content parts, text the 400 message must hold)
    ([image_part(b"plain text, not pixels")], "not a readable image"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], "only inline data URLs"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "data:image/<format>;base64"),
    ([image_part(too_big_png())], "the limit is"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (12 * 2**20)}}], "too large"),
    ([audio_part(wav(0.5), fmt="mp3")], "only 'wav'"),
    ([audio_part(b"RIFF but not really")], "not a PCM WAV"),
    ([audio_part(wav(CFG.max_audio_seconds + 0.5))], f"limit is {CFG.max_audio_seconds} s"),
    ([{"type": "text", "text": "x"}, {"type": "video_url", "video_url": {"url": "x"}}], "video_url"),
]


def test_bad_media_is_a_400_naming_the_part_and_the_problem(served):
    client, _, _ = served
    for parts, expected in BAD_MEDIA:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, parts)
        message = e.value.body["message"]
        assert e.value.status_code == 400 and expected in message and "messages.0.content" in message, message


def test_media_given_to_a_text_only_model_is_a_400():
    torch.manual_seed(0)
    with serving(Engine(debug_model(), TOK, max_queue=4, max_batch=2)) as client:
        for part, field in ((image_part(png(1)), "image_url"), (audio_part(wav(0.3)), "input_audio")):
            with pytest.raises(openai.BadRequestError) as e:
                chat(client, [{"type": "text", "text": "what is this?"}, part])
            message = e.value.body["message"]
            assert "messages.0.content.1" in message and field in message and "text only" in message, message
        assert chat(client, "hi", n=2).finish_reason in ("stop", "length")  # text still served
