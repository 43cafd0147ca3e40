import json
import math

import pytest
import torch

from conftest import small_run
from moeforge.checkpoint import latest_checkpoint, list_checkpoints
from moeforge.config import TrainConfig
from moeforge.errors import CheckpointError, ConfigError, TrainingError
from moeforge.train import Trainer, lr_at


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_checkpoint_and_loss_falls(tmp_path):
    run = small_run(tmp_path, steps=12, lr=3e-3, eval_every=6)
    summary = Trainer(run).fit()
    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "max_vio", "expert_load_max_over_mean"} <= set(m)
        assert len(m["expert_load_max_over_mean"]) == run.model.num_moe_layers
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    assert "val_loss" in metrics[5] and "val_loss" in metrics[11]
    assert (run_dir / "config.toml").read_text().count("[model]") == 1
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000012" and (ckpt / "model.safetensors").is_file()


def test_resume_matches_uninterrupted_run_step_for_step(tmp_path):
    straight = small_run(tmp_path / "a", steps=8, save_every=4, eval_every=0)
    Trainer(straight).fit()
    expected = read_metrics(tmp_path / "a" / "run")

    interrupted = Trainer(small_run(tmp_path / "b", steps=8, save_every=4, eval_every=0))
    real = interrupted.model.forward

    def killed_after_step_5(*args, **kwargs):
        if interrupted.step == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    interrupted.forward = killed_after_step_5
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step-000004"
    resumed = small_run(tmp_path / "b", steps=8, save_every=4, eval_every=0)
    Trainer(resumed, resume=True).fit()
    got = read_metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(expected, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]


def test_resume_needs_a_checkpoint_and_new_runs_do_not_overwrite(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(small_run(tmp_path), resume=True)
    Trainer(small_run(tmp_path, steps=2)).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(small_run(tmp_path, steps=2))


def poison(trainer, bad_steps):
    """Make the loss NaN on the given (0-based) steps."""
    real = trainer.model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.step in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = forward


def test_non_finite_step_is_skipped_not_applied(tmp_path):
    trainer = Trainer(small_run(tmp_path, steps=4, eval_every=0))
    poison(trainer, {1})
    trainer.fit()
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped"] for m in metrics] == [False, True, False, False]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_repeated_non_finite_steps_stop_with_last_checkpoint_intact(tmp_path):
    trainer = Trainer(small_run(tmp_path, steps=10, save_every=2, max_bad_steps=3, eval_every=0))
    poison(trainer, {4, 5, 6, 7, 8, 9})
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        trainer.fit()
    ckpts = list_checkpoints(tmp_path / "run")
    assert ckpts[-1].name == "step-000004"  # saved before the trouble, not overwritten after
    resumed = Trainer(small_run(tmp_path, steps=6, eval_every=0), resume=True)
    assert resumed.step == 4


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    Trainer(small_run(tmp_path, steps=2)).fit()
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        Trainer(small_run(tmp_path, steps=4), resume=True)


def test_interrupted_checkpoint_write_leaves_last_good_one(tmp_path, monkeypatch):
    trainer = Trainer(small_run(tmp_path, steps=2))
    trainer.fit()
    good = latest_checkpoint(tmp_path / "run")
    import moeforge.checkpoint as ck

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash)
    trainer.step = 3
    with pytest.raises(OSError):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == good
    assert (good / "trainer_state.pt").is_file()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    a = Trainer(small_run(tmp_path / "a", batch_size=4, grad_accum=2, steps=1, eval_every=0))
    b = Trainer(small_run(tmp_path / "b", batch_size=8, grad_accum=1, steps=1, eval_every=0))
    # Feed b the two micro-batches of a, concatenated.
    x1, y1 = a.train_batches.batch(0)
    x2, y2 = a.train_batches.batch(1)
    b.train_batches.batch = lambda i: (torch.cat([x1, x2]), torch.cat([y1, y2]))
    ma, mb = a.train_step(), b.train_step()
    assert math.isclose(ma["loss"], mb["loss"], rel_tol=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-4)


def test_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(100, wsd) == pytest.approx(0.0) and 0 < lr_at(91, wsd) < 1


def test_bf16_autocast_trains(tmp_path):
    summary = Trainer(small_run(tmp_path, precision="bf16", steps=6, lr=3e-3)).fit()
    assert summary["final_val_loss"] < summary["initial_val_loss"]
