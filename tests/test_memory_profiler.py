import dataclasses
import json

import pytest
import torch
from torch import nn

from moeforge import hardware
from moeforge.cli import main
from moeforge.config import preset
from moeforge.memory import ActivationRecorder
from moeforge.memory.budget import parse_budget
from moeforge.model import Transformer
from moeforge.plan.memory import layer_activation_elems
from moeforge.plan.models import from_moe


def test_saved_bytes_are_counted_once_per_storage_and_exclude_parameters():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with ActivationRecorder(net) as rec:
        net(x).sum()
    prof = rec.profile()
    # By hand: the first Linear keeps x (for its weight gradient); ReLU keeps its output, which is also the
    # second Linear's input (one storage). Weights are parameters, not activations.
    assert prof.saved_bytes == x.numel() * 4 + 5 * 16 * 4
    assert prof.by_type() == {"Linear": x.numel() * 4, "ReLU": 5 * 16 * 4}


def test_breakdowns_add_up_and_name_every_block():
    model = Transformer(preset("debug"))
    ids = torch.randint(0, 256, (2, 16))
    with ActivationRecorder(model) as rec:
        model(ids, labels=ids)
    prof = rec.profile()
    assert sum(prof.by_type().values()) == sum(prof.by_layer().values()) == prof.total_bytes > 0
    assert set(prof.by_layer()) == {"-", "layers.0", "layers.1", "layers.2", "mtp.0.block"}


@pytest.mark.parametrize("name", ["debug", "tiny"])
def test_measured_layer_activations_agree_with_the_planner_within_10_percent(name):
    """plan/memory.py estimates per-token saved elements per layer; the measured fp32 bytes of the built
    model (with the device's expert kernel: grouped GEMM, no padding) must agree within 10%."""
    cfg = dataclasses.replace(preset(name), num_nextn_predict_layers=0)
    model = Transformer(cfg)
    caps = hardware.probe("cpu")
    hardware.configure(model, caps)
    for m in model.modules():  # the planner assumes a fused attention kernel (no T x T scores kept)
        if hasattr(m, "attn_impl"):
            m.attn_impl = "sdpa"
        if hasattr(m, "impl") and not caps.grouped_mm:
            m.impl = "loop"
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with ActivationRecorder(model) as rec:
        model(ids, labels=ids)
    per_layer = rec.profile().by_layer()
    shape = from_moe(cfg, name)
    for i in range(cfg.num_hidden_layers):
        moe = i >= cfg.first_k_dense_replace
        expected = layer_activation_elems(shape, moe) * B * T * 4
        assert per_layer[f"layers.{i}"] == pytest.approx(expected, rel=0.10), (i, per_layer[f"layers.{i}"] / expected)


def test_budget_parsing():
    assert parse_budget("0.5", 1000) == 500
    assert parse_budget(0.25, 1000) == 250
    assert parse_budget("2e6", 1000) == 2e6
    assert parse_budget("1.5GiB", 0) == 1.5 * 2**30
    assert parse_budget("800MB", 0) == 800e6
    for bad in ("-1", "lots", "3 parsecs", "0"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_budget(bad, 1000)


def test_memory_command_prints_a_breakdown_and_plan(capsys):
    rc = main(["memory", "--preset", "debug", "--batch-size", "2", "--seq-len", "16", "--precision", "fp32",
               "--device", "cpu", "--activation-checkpointing", "selective", "--json", "--profile-steps", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    report, plan = out["report"], out["plan"]
    model = Transformer(preset("debug"))
    assert report["parameters"] == sum(p.numel() * 4 for p in model.parameters())
    assert report["gradients"] == report["parameters"]  # every parameter gets a gradient
    assert report["optimizer"] >= 2 * report["parameters"]  # two AdamW moments (+ step counters)
    assert 0 < report["activations"] == plan["held_bytes"] < plan["baseline_bytes"]
    assert report["peak_rss"] > 0


def test_memory_command_rejects_bad_settings(capsys):
    assert main(["memory", "--preset", "debug", "--activation-checkpointing", "sometimes"]) == 2
    assert "activation_checkpointing must be" in capsys.readouterr().err
    assert main(["memory", "--preset", "debug", "--memory-budget", "0.5"]) == 2
    assert "applies to --activation-checkpointing auto" in capsys.readouterr().err


def test_train_profile_memory_writes_memory_json(tmp_path, capsys):
    from conftest import SMALL_CORPUS

    run_dir = tmp_path / "run"
    rc = main(["train", "--profile-memory", "--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "16",
               "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--run-dir", str(run_dir)])
    assert rc == 0
    report = json.loads((run_dir / "memory.json").read_text())
    assert report["activations"] == sum(report["activations_by_layer"].values()) > 0
    assert "optimizer states" in capsys.readouterr().err


def _memory_json(capsys, *flags):
    rc = main(["memory", "--preset", "debug", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
               "--profile-steps", "1", "--json", *flags])
    assert rc == 0
    return json.loads(capsys.readouterr().out)["report"]


def test_memory_command_measures_fp8_with_the_fp8_modules(capsys):
    """--precision fp8 swaps in the FP8 linears and experts (as the trainer does), so what they save for
    backward (quantized copies, not the bf16 inputs) is what gets measured."""
    from moeforge.precision import apply_fp8

    bf16 = _memory_json(capsys, "--precision", "bf16")
    fp8 = _memory_json(capsys, "--precision", "fp8")
    swapped = Transformer(preset("debug"))
    apply_fp8(swapped, "fp8")
    plain_types = {type(m).__name__ for m in Transformer(preset("debug")).modules()}
    fp8_types = {type(m).__name__ for m in swapped.modules()} - plain_types
    assert fp8_types == {"Fp8Linear", "Fp8GroupedExperts"}
    assert fp8_types <= set(fp8["activations_by_type"]) and not fp8_types & set(bf16["activations_by_type"])
    assert "GroupedExperts" not in fp8["activations_by_type"]
    assert fp8["parameters"] == bf16["parameters"]  # master weights stay fp32
    assert fp8["activations"] < bf16["activations"]


def _other_value(field):
    """A valid value different from the field's default (to pass as a flag)."""
    special = {"data": "corpus.txt", "tokenizer": "tokenizer.json", "schedule": "wsd", "routing": "balanced",
               "pp_schedule": "gpipe", "offload": "optimizer", "run_dir": "somewhere", "sample_prompt": "x",
               "ep_dispatch": ["fp8", "--ep", "2"], "redundant_experts": ["2", "--ep", "2", "--rebalance-every", "1"],
               "rebalance_every": ["1", "--ep", "2", "--redundant-experts", "2"], "bias_update_final_speed": "1e-4", "val_fraction": "0.1",
               "min_lr_ratio": "0.5", "wsd_decay_fraction": "0.3", "bias_freeze_fraction": "0.5"}
    if field.name in special:
        value = special[field.name]
        return value if isinstance(value, list) else [value]
    if isinstance(field.default, bool):
        return []  # the flag (or --no-flag) itself
    if isinstance(field.default, int):
        return [str(field.default + 1)]
    return [str(field.default * 2)]


# What one process measuring AdamW steps on random tokens can apply; every other train flag must be refused.
APPLIED_BY_MEMORY = {"preset", "seq_len", "batch_size", "precision", "optimizer_state_dtype", "device", "seed", "lr",
                     "weight_decay", "beta1", "beta2", "activation_checkpointing", "memory_budget"}


def _unapplied_fields():
    from moeforge.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.name not in APPLIED_BY_MEMORY]


@pytest.mark.parametrize("field", _unapplied_fields(), ids=lambda f: f.name)
def test_memory_command_refuses_every_train_flag_it_does_not_apply(field, capsys):
    flag = "--" + field.name.replace("_", "-")
    if isinstance(field.default, bool):
        flag = flag if not field.default else "--no-" + flag[2:]
    precision = "fp8" if field.name == "fp8_policy" else "fp32"  # the policy needs fp8
    rc = main(["memory", "--preset", "debug", "--batch-size", "1", "--seq-len", "8", "--device", "cpu",
               "--profile-steps", "1", "--precision", precision, flag, *_other_value(field)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and flag in err and "not applied by `moeforge memory`" in err


def test_memory_command_refuses_a_config_file_that_distributes_or_offloads(tmp_path, capsys):
    """A run's config.toml carries every field: the ones that do not change the measurement (data, steps)
    are fine there, the ones that would change it (nproc, offload) are refused."""
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\npreset = "debug"\ndata = "nowhere.txt"\nsteps = 5\nnproc = 2\noffload = "all"\n')
    rc = main(["memory", "--config", str(toml), "--batch-size", "1", "--seq-len", "8", "--device", "cpu",
               "--profile-steps", "1", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--nproc 2, --offload all" in err and "--data" not in err and len(err.strip().splitlines()) == 1
    toml.write_text('[train]\npreset = "debug"\ndata = "nowhere.txt"\nsteps = 5\nnproc = 1\n')
    assert main(["memory", "--config", str(toml), "--batch-size", "1", "--seq-len", "8", "--device", "cpu",
                 "--profile-steps", "1", "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"]["tokens_per_micro_batch"] == 8
