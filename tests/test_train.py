import copy
import json
import math
from pathlib import Path

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


def kill_during_step(trainer, step):
    """Make the trainer die (as on Ctrl-C) when it starts 0-based step `step`."""
    real = trainer.forward

    def forward(*args, **kwargs):
        if trainer.step == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    trainer.forward = forward


def test_resume_across_the_end_of_warmup_into_the_decay_matches_a_straight_run(tmp_path):
    settings = dict(steps=7, warmup_steps=4, save_every=3, eval_every=0)
    Trainer(small_run(tmp_path / "a", **settings)).fit()
    interrupted = Trainer(small_run(tmp_path / "b", **settings))
    kill_during_step(interrupted, 4)  # checkpoint at 3 (warmup), the resumed run crosses into the cosine
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    Trainer(small_run(tmp_path / "b", **settings), resume=True).fit()
    want, got = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in got] == list(range(1, 8))
    cfg = small_run(tmp_path, **settings).train
    assert [m["lr"] for m in got[2:6]] == [lr_at(s, cfg) for s in range(2, 6)]
    assert got[2]["lr"] < got[3]["lr"] == cfg.lr > got[5]["lr"]  # warmup ends at step 4, then the cosine
    for a, b in zip(want, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


def run_cli(*args):
    from moeforge.cli import main

    return main(["train", *args])


def cli_flags(run_dir, *extra):
    from conftest import SMALL_CORPUS

    return ["--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "4",
            "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu",
            "--precision", "fp32", "--warmup-steps", "2", "--run-dir", str(run_dir), *extra]


def test_resume_refuses_a_changed_seed_and_batch_size_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(*cli_flags(run, "--steps", "2")) == 0
    capsys.readouterr()
    assert run_cli("--resume", "--run-dir", str(run), "--steps", "3", "--batch-size", "2", "--seed", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size 4 -> 2" in err[0] and "seed 1234 -> 5" in err[0]
    assert "batch_size, seed would not continue the run exactly" in err[0] and "--allow-config-change" in err[0]
    assert latest_checkpoint(run).name == "step-000002"  # nothing ran
    assert run_cli("--resume", "--run-dir", str(run), "--steps", "3", "--batch-size", "2", "--seed", "5",
                   "--allow-config-change", "seed,batch_size") == 0
    assert "config changed on resume: batch_size 4 -> 2, steps 2 -> 3, seed 1234 -> 5" in capsys.readouterr().err
    assert 'seed = 5' in (run / "config.toml").read_text()


def test_resume_keeps_model_fields_set_to_none(tmp_path):
    """-m q_lora_rank=none survives config.toml: the resumed model has the plain q projection it was saved with."""
    run = tmp_path / "run"
    assert run_cli(*cli_flags(run, "--steps", "2"), "-m", "q_lora_rank=none") == 0
    assert run_cli("--resume", "--run-dir", str(run), "--steps", "3") == 0
    assert latest_checkpoint(run).name == "step-000003"
    assert 'q_lora_rank = "none"' in (run / "config.toml").read_text()


def test_growing_steps_on_resume_under_wsd_equals_a_straight_longer_run(tmp_path):
    """The schedules are functions of (step, --steps): a resume with more steps continues as if the run had
    been planned that long. WSD's learning rate does not depend on --steps before its decay, so a run
    resumed there with more steps equals the straight longer run exactly (docs/training.md)."""
    settings = dict(schedule="wsd", eval_every=0)
    Trainer(small_run(tmp_path / "a", steps=8, **settings)).fit()
    Trainer(small_run(tmp_path / "b", steps=4, **settings)).fit()
    Trainer(small_run(tmp_path / "b", steps=8, **settings), resume=True).fit()
    want, got = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(want, got):
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"]), a["step"]
    # Under the cosine the decay is stretched to the new end: the learning rate jumps up at the resume step.
    Trainer(small_run(tmp_path / "c", steps=4, eval_every=0)).fit()
    longer = small_run(tmp_path / "c", steps=8, eval_every=0)
    Trainer(longer, resume=True).fit()
    lrs = [m["lr"] for m in read_metrics(tmp_path / "c" / "run")]
    assert lrs[4:] == [lr_at(s, longer.train) for s in range(4, 8)] and lrs[4] > lrs[3]


def test_torn_last_metrics_line_does_not_break_resume_or_report(tmp_path, capsys):
    from moeforge.report import read_metrics as report_rows

    Trainer(small_run(tmp_path, steps=2, eval_every=0)).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"step": 3, "loss": 5.4, "lr": 0.00')  # power loss mid-append
    assert [r["step"] for r in report_rows(tmp_path / "run")] == [1, 2]
    assert "metrics.jsonl:3: dropped a torn last line" in capsys.readouterr().err
    Trainer(small_run(tmp_path, steps=3, eval_every=0), resume=True).fit()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_temporary_folders_of_a_crashed_save_are_cleaned_up_on_the_next_start(tmp_path):
    Trainer(small_run(tmp_path, steps=4, save_every=2, keep_checkpoints=5, eval_every=0)).fit()
    base = tmp_path / "run" / "checkpoints"
    # A crash while re-saving step 4: the old step-4 moved aside, its replacement half written; and a stray
    # temporary folder of another save.
    (base / "step-000004").rename(base / ".old-step-000004-77")
    (base / ".tmp-step-000004-77").mkdir()
    (base / ".tmp-step-000006-78").mkdir()
    (base / ".tmp-step-000006-78" / "model.safetensors").write_bytes(b"\0" * 10)
    resumed = Trainer(small_run(tmp_path, steps=5, eval_every=0), resume=True)
    assert resumed.step == 4  # the good checkpoint came back, not step 2
    assert sorted(p.name for p in base.iterdir()) == ["step-000002", "step-000004"]


def fp8_run(tmp_path, **train):
    return small_run(tmp_path, precision="fp8", fp8_policy=True, **train)


def strict_policy(trainer):
    """Thresholds inside the spread of E4M3's quantisation error here (0.020-0.026): layers leave and
    rejoin FP8 during the run, so the policy's state at the checkpoint decides the losses that follow."""
    from moeforge.precision import PolicyThresholds

    trainer.precision_policy.t = PolicyThresholds(error_high=0.025, error_low=0.024, patience=2)
    return trainer


def test_fp8_policy_resumes_exactly(tmp_path):
    settings = dict(steps=6, save_every=3, eval_every=0)
    straight = strict_policy(Trainer(fp8_run(tmp_path / "a", **settings)))
    straight.fit()
    interrupted = strict_policy(Trainer(fp8_run(tmp_path / "b", **settings)))
    kill_during_step(interrupted, 4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = strict_policy(Trainer(fp8_run(tmp_path / "b", **settings), resume=True))
    resumed.fit()
    want, got = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert any("precision_switches" in m for m in want[:3])  # the state at the checkpoint matters
    assert 0 < want[-1]["fp8_layer_fraction"] < 1
    for a, b in zip(want, got):
        assert (a["loss"], a["fp8_layer_fraction"]) == (b["loss"], b["fp8_layer_fraction"]), a["step"]
    assert resumed.precision_policy.state_dict() == straight.precision_policy.state_dict()


def test_non_finite_step_in_an_fp8_run_leaves_weights_and_policy_untouched(tmp_path):
    trainer = Trainer(fp8_run(tmp_path, steps=4, eval_every=0))
    policy = trainer.precision_policy
    trainer.train_step()
    trainer.step += 1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    policy_state = copy.deepcopy(policy.state_dict())
    poison(trainer, {1})
    m = trainer.train_step()
    trainer.step += 1
    assert m["skipped"] and not math.isfinite(m["loss"])
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert policy.state_dict() == policy_state
    assert all(mod.stats.act is None and mod.stats.grad is None for mod in policy.modules.values())
    m = trainer.train_step()  # the run goes on
    assert not m["skipped"] and math.isfinite(m["loss"])
    assert all(len(s["act"]) == 2 for s in policy.state_dict().values())  # steps 1 and 3, not 2


def test_fp8_policy_does_not_see_the_activation_checkpointing_planning_pass(tmp_path):
    trainer = Trainer(fp8_run(tmp_path, activation_checkpointing="selective", eval_every=0))
    assert trainer.memory_plan.names  # the planner ran forwards with gradients on
    assert all(m.stats.act is None for m in trainer.precision_policy.modules.values())


def test_precision_auto_is_resolved_once_written_to_config_and_kept_on_resume(tmp_path, monkeypatch):
    """auto follows the device's capabilities (no timing), lands in config.toml, and a resume on a device
    that would now pick the other precision keeps the saved one."""
    import dataclasses

    from moeforge import hardware
    from moeforge.config import load_toml, resolve_run_config

    real = hardware.probe

    def device_says(bf16):
        monkeypatch.setattr(hardware, "probe", lambda device="auto": dataclasses.replace(real(device), bf16=bf16))

    device_says(False)
    trainer = Trainer(small_run(tmp_path, precision="auto", steps=1, eval_every=0))
    assert trainer.cfg.precision == "fp32" and trainer.amp_dtype is None
    trainer.fit()
    assert load_toml(tmp_path / "run" / "config.toml")["train"]["precision"] == "fp32"
    device_says(True)
    again = Trainer(resolve_run_config(load_toml(tmp_path / "run" / "config.toml"), {"steps": 2}), resume=True)
    assert again.cfg.precision == "fp32" and again.amp_dtype is None
    explicit_auto = Trainer(small_run(tmp_path, precision="auto", steps=2, eval_every=0), resume=True)
    assert explicit_auto.cfg.precision == "fp32"


def _two_ranks(rank, world, init_file, out_dir):
    """One rank: `--precision auto` with the ranks' devices disagreeing about bf16, then 3 steps of an FP8
    run with the policy whose statistics differ per rank (each sees its half of the batch)."""
    import dataclasses

    import torch.distributed as dist

    from moeforge import hardware
    from moeforge.parallel.trainer import DistributedTrainer
    from parallel_helpers import init_gloo

    init_gloo(rank, world, init_file)
    real = hardware.probe
    hardware.probe = lambda device="auto": dataclasses.replace(real(device), bf16=rank == 1)
    out = Path(out_dir)
    auto = DistributedTrainer(small_run(out / "auto", precision="auto", steps=1))
    trainer = strict_policy(DistributedTrainer(fp8_run(out / "fp8", steps=3, eval_every=0)))
    switches = []
    for _ in range(3):
        switches += trainer.train_step().get("precision_switches", [])
        trainer.step += 1
    torch.save({"precision": auto.cfg.precision, "amp": str(auto.amp_dtype), "switches": switches,
                "policy": trainer.precision_policy.state_dict()}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_agree_on_precision_auto_and_on_every_fp8_policy_decision(tmp_path):
    from moeforge.config import load_toml
    from parallel_helpers import start_ranks

    start_ranks(_two_ranks, (2, str(tmp_path / "init"), str(tmp_path)), 2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["precision"] == r1["precision"] == "fp32" and r0["amp"] == r1["amp"] == "None"  # rank 0's device
    assert load_toml(tmp_path / "auto" / "run" / "config.toml")["train"]["precision"] == "fp32"
    assert r0["switches"] and r0["switches"] == r1["switches"]
    assert r0["policy"] == r1["policy"]
