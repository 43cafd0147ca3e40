"""moeforge.multimodal: features against librosa, encoder shapes and padding masks, media injection,
labels off the media, learning, checkpoints and resume, per-modality expert load, espeak-ng speech."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_run
from moeforge.config import ModelConfig, PRESETS
from moeforge.data import ByteTokenizer
from moeforge.errors import DataError
from moeforge.model import Transformer
from moeforge.multimodal import data as mmdata
from moeforge.multimodal import media
from moeforge.multimodal.data import DIGITS, Example, collate, image_examples, speech_examples
from moeforge.multimodal.encoders import MultimodalConfig, pad_clip
from moeforge.multimodal.evaluate import ModalityLoad, word_accuracy
from moeforge.multimodal.generation import greedy_answers
from moeforge.multimodal.model import AUDIO, IGNORE, IMAGE, TEXT, MultimodalLM, from_pretrained

TOK = ByteTokenizer()
CFG = MultimodalConfig(vision_dim=32, vision_layers=1, audio_dim=32, audio_layers=1, max_audio_seconds=1.0)


def tone_clips(settings=((0.5, 1.0), (0.8, 1.1))):
    """Pure-synthetic 'speech': digit d is a 0.2 s tone at 300 + 120 d Hz (per-'speaker' loudness, pitch)."""
    t = np.arange(int(0.2 * media.SAMPLE_RATE)) / media.SAMPLE_RATE
    return [(d, (amp * np.sin(2 * np.pi * (300 + 120 * d) * shift * t)).astype(np.float32), ("tone", i, 0))
            for i, (amp, shift) in enumerate(settings) for d in range(10)]


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return MultimodalLM(Transformer(ModelConfig(**PRESETS["debug"])), CFG).eval()


def test_log_mel_power_matches_transformers_reference():
    """transformers' numpy audio_utils (Slaney mel filters, centred STFT) as the independent reference;
    librosa.feature.melspectrogram agrees too (checked by hand; its numba start-up is too slow for CI)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    x = np.random.default_rng(0).normal(0, 0.1, 12345).astype(np.float32)
    filters = mel_filter_bank(num_frequency_bins=media.N_FFT // 2 + 1, num_mel_filters=media.N_MELS,
                              min_frequency=0.0, max_frequency=media.SAMPLE_RATE / 2,
                              sampling_rate=media.SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    ref = spectrogram(x, window_function(media.N_FFT, "hann"), frame_length=media.N_FFT, hop_length=media.HOP,
                      power=2.0, center=True, pad_mode="constant", mel_filters=filters)
    ours = media.mel_power(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_wav_decoding_resamples_and_rejects_non_wav():
    x = np.sin(np.arange(22050) / 22050 * 2 * np.pi * 440).astype(np.float32) * 0.5
    back = media.decode_wav(media.encode_wav(x, rate=22050))
    assert abs(len(back) - media.SAMPLE_RATE) <= 1  # 1 s at 16 kHz
    with pytest.raises(DataError, match="not a PCM WAV"):
        media.decode_wav(b"definitely not audio")
    with pytest.raises(DataError, match="not a readable image"):
        media.decode_image(b"\x89PNG but broken", 32)


def test_encoder_shapes_and_padding_never_matters():
    model = tiny_lm()
    D = model.config.hidden_size
    images = torch.rand(3, 3, CFG.image_size, CFG.image_size)
    assert model.vision(images).shape == (3, CFG.image_tokens, D)
    clip = np.random.default_rng(1).normal(0, 0.1, 6000).astype(np.float32)
    mel, frames = pad_clip(clip, CFG)
    assert mel.shape == (CFG.n_mels, CFG.audio_frames) and frames == media.frames_for(6000)
    garbage = mel.clone()
    garbage[:, frames:] = torch.randn(CFG.n_mels, CFG.audio_frames - frames) * 5
    with torch.no_grad():
        out = model.audio(torch.stack([mel, garbage]), torch.tensor([frames, frames]))
    assert out.shape == (2, CFG.audio_tokens, D)
    torch.testing.assert_close(out[0], out[1])  # what the padding holds changes nothing
    with pytest.raises(DataError, match="limit is 1.0 s"):
        pad_clip(np.zeros(media.SAMPLE_RATE * 2, np.float32), CFG)


def test_media_vectors_replace_placeholders_in_order_and_labels_skip_media():
    model = tiny_lm()
    imgs = image_examples("train", 2, CFG)
    speech = speech_examples("train", 1, CFG, tone_clips())
    examples = [imgs[0], speech[0], imgs[1]]
    batch = collate(examples, CFG, TOK)
    with torch.no_grad():
        h = model.embed(batch)
        vis = model.vision(torch.stack([imgs[0].media, imgs[1].media]))
        mel, frames = pad_clip(speech[0].media, CFG)
        aud = model.audio(mel[None], torch.tensor([frames]))
        text = model.lm.embed_tokens(batch.input_ids)
    types = batch.token_type
    torch.testing.assert_close(h[0][types[0] == IMAGE], vis[0])
    torch.testing.assert_close(h[2][types[2] == IMAGE], vis[1])
    torch.testing.assert_close(h[1][types[1] == AUDIO], aud[0])
    torch.testing.assert_close(h[types == TEXT], text[types == TEXT])
    # Targets: only the answer (and its eos) is predicted, never a media or prompt position.
    for b, ex in enumerate(examples):
        y, ids = batch.targets[b], batch.input_ids[b]
        assert (y[types[b] != TEXT] == IGNORE).all()
        answer = TOK.encode(ex.answer) + [TOK.eos_id]
        assert [int(t) for t in y if t != IGNORE] == answer
        first = int((y != IGNORE).nonzero()[0])
        assert ids[first + 1:first + 1 + len(answer)].tolist() == answer
    # The media positions' token ids are placeholders: changing them changes nothing.
    other = collate(examples, CFG, TOK)
    other.input_ids[types != TEXT] = 65
    with torch.no_grad():
        assert model.media_loss(batch).item() == pytest.approx(model.media_loss(other).item(), abs=1e-6)
    too_few = collate(examples[:1], CFG, TOK)
    too_few.images = None
    with pytest.raises(ValueError, match="image positions but no image"):
        model.embed(too_few)


def test_training_examples_are_laid_out_as_the_server_lays_out_a_chat_request():
    """A chat request whose content is the image then a training question, parsed as the server parses it,
    is the training sequence without its answer: the server's chat template is what training uses."""
    from moeforge.inference.openai_api import ChatRequest, MediaPart, chat_segments
    from moeforge.multimodal.serving import layout

    ex = image_examples("train", 1, CFG)[0]
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    req = ChatRequest.model_validate({"messages": [{"role": "user", "content": [part, {"type": "text",
                                                                                       "text": ex.prompt}]}]})
    segments = [("image", None) if isinstance(s, MediaPart) else s for s in chat_segments(req.messages)]
    served, served_types, _ = layout(segments, CFG, TOK)
    ids, types, targets = mmdata.example_tokens(ex, CFG, TOK)
    eos = TOK.eos_id
    want = [eos] + TOK.encode("user: ") + [eos] * CFG.image_tokens + TOK.encode(ex.prompt + "\nassistant:")
    assert served == want and ids[:len(want)] == want and types[:len(want)] == served_types
    assert ids[len(want):] == TOK.encode(ex.answer) + [eos]  # the answer follows "assistant:"
    assert [t for t in targets if t != IGNORE] == TOK.encode(ex.answer) + [eos]


def test_cached_greedy_decoding_matches_full_recompute():
    model = tiny_lm(3)
    examples = image_examples("test", 3, CFG)[:1] + speech_examples("test", 1, CFG, tone_clips())
    got = greedy_answers(model, examples, CFG, TOK, max_new=6)
    for ex, answer in zip(examples, got):
        batch = collate([ex], CFG, TOK, with_answer=False)
        with torch.no_grad():
            h, out = model.embed(batch), []
            for _ in range(6):
                nxt = model.lm.logits_from_embeddings(h)[:, -1].argmax(-1)
                if int(nxt) == TOK.eos_id:
                    break
                out.append(int(nxt))
                h = torch.cat([h, model.lm.embed_tokens(nxt)[:, None]], 1)
        assert answer == TOK.decode(out).strip()


def test_expert_load_per_modality_adds_up_to_the_models_own_counts():
    model = tiny_lm()
    batch = collate(image_examples("train", 2, CFG) + speech_examples("train", 2, CFG, tone_clips()), CFG, TOK)
    load = ModalityLoad(model)
    load.types = batch.token_type
    for _, moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    with torch.no_grad():
        model.media_logits(batch)
    load.remove()
    K = model.config.num_experts_per_tok
    for layer, (_, moe) in enumerate(model.moe_layers()):
        torch.testing.assert_close(load.counts[:, layer].sum(0), moe.tokens_per_expert.float())
        for kind in (TEXT, IMAGE, AUDIO):
            assert load.counts[kind, layer].sum() == K * int((batch.token_type == kind).sum())
    shares = load.fractions()
    assert set(shares) == {"text", "image", "audio"}
    assert sum(shares["image"][0]) == pytest.approx(1.0)


def test_word_accuracy_counts_edits():
    assert word_accuracy(["one two three"], ["one two three"]) == 1.0
    assert word_accuracy(["one two three"], ["one three"]) == pytest.approx(2 / 3)  # a deletion
    assert word_accuracy(["one two", "five"], ["one six", "five five"]) == pytest.approx(1 / 3)  # sub + insertion


def test_image_qa_is_learned_by_the_encoder_and_lm():
    model = tiny_lm().train()
    examples = image_examples("train", 24, CFG)
    batch = collate(examples, CFG, TOK)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.media_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_media_answer_tokens_weigh_like_text_tokens(tmp_path, tone_speech):
    """A step's gradient is that of the text loss plus every media answer token's loss, times
    mm_answer_weight, summed and divided by the text micro-batch's token count (written out here)."""
    import torch.nn.functional as F

    from moeforge.multimodal.train import MultimodalTrainer

    for weight in (1.0, 3.0):
        trainer = MultimodalTrainer(mm_run(tmp_path / str(weight), steps=1, eval_every=0, seq_aux_alpha=0.0,
                                           mm_answer_weight=weight))
        model, cfg = trainer.model, trainer.cfg
        model.zero_grad()
        trainer.forward_backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        model.zero_grad()
        x, y = trainer.train_batches.batch(0)
        model(x, shift_labels=y).loss.backward()
        for sampler in (trainer.image_batches, trainer.speech_batches):
            batch = sampler.batch(0)
            per_token = F.cross_entropy(model.media_logits(batch).flatten(0, 1), batch.targets.flatten(),
                                        ignore_index=IGNORE, reduction="none")
            (per_token.sum() * weight / (cfg.batch_size * cfg.seq_len)).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=f"weight {weight}: {n}")


def test_multimodal_settings_are_checked():
    from moeforge.errors import ConfigError

    with pytest.raises(ConfigError, match="mm_answer_weight must be > 0"):
        small_run(Path("/nonexistent"), mm_answer_weight=0)
    with pytest.raises(ConfigError, match="mm_encoder_lr must be > 0"):
        small_run(Path("/nonexistent"), mm_encoder_lr=0)


def test_encoders_step_at_their_fraction_of_the_learning_rate(tmp_path, tone_speech):
    """Adam's first step moves every weight with a non-zero gradient by about the learning rate (|g| / (|g| +
    eps) ~ 1, weight decay adds < 1%): the encoders' largest move is mm_encoder_lr x the LM's. A text-only
    trainer keeps its two optimizer groups."""
    from moeforge.multimodal.train import MultimodalTrainer
    from moeforge.train import Trainer

    trainer = MultimodalTrainer(mm_run(tmp_path / "mm", steps=1, eval_every=0, mm_encoder_lr=0.3,
                                       warmup_steps=0, grad_clip=0.0))
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.ndim == 2}
    lm = max(v for n, v in moved.items() if n.startswith("lm."))
    enc = max(v for n, v in moved.items() if n.startswith(("vision.", "audio.")))
    assert enc / lm == pytest.approx(0.3, rel=0.02)
    scales = {g["lr_scale"] for g in trainer.optimizer.param_groups}
    assert scales == {1.0, 0.3}
    text = Trainer(small_run(tmp_path / "text", steps=1, eval_every=0))
    assert [g["lr_scale"] for g in text.optimizer.param_groups] == [1.0, 1.0]


def mm_run(tmp_path, **train):
    return small_run(tmp_path, multimodal=True, mm_examples=16, mm_batch_size=4, seq_len=32, batch_size=2,
                     **train)


@pytest.fixture
def tone_speech(monkeypatch):
    """The trainer's speech clips from tones, so these tests need no espeak-ng."""
    from moeforge.multimodal import train as mmtrain

    monkeypatch.setattr(mmtrain, "word_clips", lambda split: tone_clips())


def test_trainer_checkpoints_encoders_beside_the_lm_and_resumes_exactly(tmp_path, tone_speech):
    from moeforge import from_pretrained as load_lm
    from moeforge.multimodal.train import MultimodalTrainer

    full = MultimodalTrainer(mm_run(tmp_path / "a", steps=4, save_every=2, eval_every=0))
    summary = full.fit()
    assert {"image_accuracy", "speech_word_accuracy", "expert_load_by_modality"} <= set(summary)
    assert set(summary["expert_load_by_modality"]) == {"text", "image", "audio"}
    saved = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert set(saved["expert_load_separation"]) == {"text/image", "text/audio", "image/audio"}
    from moeforge.multimodal.report import plot_modality_load

    assert plot_modality_load(tmp_path / "a" / "run", tmp_path / "plots")[0].stat().st_size > 1000
    assert saved["image_chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 4) / 3)
    metrics = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("image_loss" in m and "speech_loss" in m for m in metrics)

    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step-000004"
    assert (ckpt / "multimodal" / "encoders.safetensors").is_file() and (ckpt / "model.safetensors").is_file()
    lm = load_lm(ckpt)  # the LM part alone, as any moeforge/HF checkpoint
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(v, full.model.lm.state_dict()[k])
    loaded = from_pretrained(ckpt)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k])

    # Interrupted at step 2, resumed: the same weights as the uninterrupted run.
    half = MultimodalTrainer(mm_run(tmp_path / "c", steps=4, save_every=2, eval_every=0))
    half.cfg.steps = 2
    half.fit()
    resumed = MultimodalTrainer(mm_run(tmp_path / "c", steps=4, save_every=2, eval_every=0), resume=True)
    assert resumed.step == 2
    resumed.fit()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k], msg=k)


def test_multimodal_refuses_several_processes(tmp_path):
    from moeforge.cli import main

    assert main(["train", "--multimodal", "--nproc", "2", "--run-dir", str(tmp_path / "r")]) == 2


@pytest.mark.skipif(not mmdata.espeak_available(), reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_espeak_speech_clips_have_transcripts():
    clips = [(d, mmdata.synthesise(DIGITS[d], "en-us", 160, 50), ("en-us", 160, 50)) for d in (1, 7)]
    for _, wave_, _ in clips:
        assert 0.15 * media.SAMPLE_RATE < len(wave_) < 1.0 * media.SAMPLE_RATE
        assert np.abs(wave_).max() > 0.05
    examples = speech_examples("train", 4, MultimodalConfig(), clips)
    assert all(set(ex.answer.split()) <= {"one", "seven"} for ex in examples)


def test_generate_cli_with_image_and_audio_and_bad_media(tmp_path, capsys):
    from moeforge.cli import main
    from moeforge.multimodal.model import save_pretrained

    model = tiny_lm(5)
    save_pretrained(model, tmp_path / "ckpt")
    ex = image_examples("test", 1, CFG)[0]
    png = tmp_path / "shape.png"
    mmdata.render_image("circle", "red", "top left", np.random.default_rng(0), CFG.image_size).save(png)
    wav = tmp_path / "tone.wav"
    wav.write_bytes(media.encode_wav(tone_clips()[3][1]))
    img = media.decode_image(png.read_bytes(), CFG.image_size)
    expected = greedy_answers(model, [Example("image", img, ex.prompt, "", "")], CFG, TOK, max_new=5)[0]
    base = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--temperature", "0", "--max-new-tokens", "5"]
    assert main(base + ["--image", str(png), "--prompt", ex.prompt]) == 0
    assert capsys.readouterr().out.strip() == (ex.prompt + expected).strip()
    assert main(base + ["--audio", str(wav), "--prompt", "Transcribe: "]) == 0
    assert capsys.readouterr().out.startswith("Transcribe: ")
    assert main(base + ["--image", str(wav)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    long_wav = tmp_path / "long.wav"
    long_wav.write_bytes(media.encode_wav(np.zeros(media.SAMPLE_RATE * 3, np.float32)))
    assert main(base + ["--audio", str(long_wav)]) == 2
    assert "limit is 1.0 s" in capsys.readouterr().err
    lm_only = tmp_path / "lm"
    from moeforge.hf import save_pretrained as save_lm

    save_lm(model.lm, lm_only)
    assert main(["generate", "--checkpoint", str(lm_only), "--image", str(png)]) == 2
    assert "not a multimodal checkpoint" in capsys.readouterr().err
