"""`moeforge train --nproc 2 ...` as a user runs it: torchrun is launched, one rank reports, the logged
(global) loss equals a single-process run's on the same global batch, a run moves from one process to two
and back through its checkpoints, continuing exactly, and bad layouts fail before any process starts.
Every layout (and 4 processes) is compared with the single process in test_parallel_distributed, through
the same DistributedTrainer in a spawned group (cheaper than a torchrun launch per layout)."""

import importlib.util
import json
import os

import pytest

from conftest import SMALL_CORPUS
from moeforge.cli import main
from parallel_helpers import one_thread, read_metrics

TENSORBOARD = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []
SMALL = ["--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "4",
         "--eval-batches", "2", "--eval-every", "2", "--sample-tokens", "0", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_run_moves_from_one_process_to_two_and_back_and_matches_single_process(tmp_path, capfd):
    single, run = tmp_path / "single", tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "6", "--run-dir", str(single)]) == 0
    # Steps 1-2 in one process (Hugging Face checkpoint), 3-4 on 2 ranks with EP=2 (reads it, writes a
    # distributed checkpoint), 5-6 in one process again (reads that).
    assert main(["train", *SMALL, "--steps", "2", "--save-every", "2", "--keep-checkpoints", "5",
                 "--run-dir", str(run), *TENSORBOARD]) == 0
    capfd.readouterr()
    env_before = dict(os.environ)
    assert main(["train", "--resume", "--run-dir", str(run), "--steps", "4", "--nproc", "2", "--ep", "2"]) == 0
    err = capfd.readouterr().err
    assert err.count("moeforge train ->") == 1 and "dp 2 (ep 2 x edp 1)" in err  # rank 0 only
    assert dict(os.environ) == env_before  # the launcher leaves this process as it was
    ckpt = run / "checkpoints" / "step-000004"
    assert (ckpt / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    assert "- steps: 4;" in (ckpt / "README.md").read_text() and "dp 2, ep 2" in (ckpt / "README.md").read_text()
    assert 'nproc = 2' in (run / "config.toml").read_text()  # the ranks record the launch, not nproc = 1
    assert main(["train", "--resume", "--run-dir", str(run), "--steps", "6", "--nproc", "1", "--ep", "1"]) == 0

    want, got = read_metrics(single), read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, 7))  # one line per step: only rank 0 wrote
    for a, b in zip(got, want):
        for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
        assert a["expert_counts"] == b["expert_counts"]
    if TENSORBOARD:  # one events file per phase: rank 1 of the 2-rank phase wrote none
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(m["step"], pytest.approx(m["loss"]))
                                                                            for m in got]


def test_bad_layouts_fail_in_one_line_before_any_process_starts(tmp_path, capfd):
    for flags, message in ((["--pp", "2", "--pp-microbatches", "3"], "pp_microbatches=3 must divide the 4 sequences"),
                           (["--pp", "2", "--pp-schedule", "dualpipev", "--pp-microbatches", "2"],
                            "needs at least 4 micro-batches"),
                           (["--pp", "2", "--compile"], "--compile is not applied to pipeline stages"),
                           (["--pp", "2", "-m", "num_hidden_layers=1"], "pp=2 exceeds num_hidden_layers=1"),
                           (["--pp", "2", "--pp-schedule", "zb"], "pp_schedule must be gpipe, 1f1b"),
                           (["--tp", "3"], "does not divide the 2 processes"),
                           (["--ep", "3", "--dp", "2"], "ep=3 must divide dp=2")):
        assert main(["train", *SMALL, "--steps", "1", "--run-dir", str(tmp_path / "x"), "--nproc", "2", *flags]) == 2
        err = capfd.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # ZeRO-3 of pipeline stages is refused (4 processes named, none started: the layout is checked first).
    for flags, message in ((["--zero", "3"], "--zero 3 with pp=2 x dp=2"),
                           (["--ep", "2", "--zero", "3"], "--zero 3 with pp=2 x dp=2")):
        assert main(["train", *SMALL, "--steps", "1", "--run-dir", str(tmp_path / "x"), "--nproc", "4", "--pp", "2",
                     *flags]) == 2
        err = capfd.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_single_process_checkpoint_continues_under_pipeline_parallelism(tmp_path):
    """Steps 1-2 in one process (Hugging Face weights + the optimizer state numbered in the whole model's
    order), 3-4 at pp=2 with DualPipeV (each rank takes its stages' weights and state; rank 0's two
    embeddings both take the embedding's): the numbers of 4 single-process steps."""
    single, run = tmp_path / "single", tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "4", "--run-dir", str(single)]) == 0
    assert main(["train", *SMALL, "--steps", "2", "--save-every", "2", "--run-dir", str(run)]) == 0
    assert main(["train", "--resume", "--run-dir", str(run), "--steps", "4", "--nproc", "2", "--pp", "2",
                 "--pp-schedule", "dualpipev"]) == 0
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])


def test_activation_checkpointing_under_ep_and_zero3_matches_single_process(tmp_path):
    """auto checkpointing measures on every rank, but all ranks must recompute the same regions (a region
    holding the EP all-to-all recomputed on one rank only would be a collective mismatch)."""
    single, run = tmp_path / "single", tmp_path / "ac"
    assert main(["train", *SMALL, "--steps", "2", "--run-dir", str(single)]) == 0
    assert main(["train", *SMALL, "--steps", "2", "--run-dir", str(run), "--nproc", "2", "--ep", "2", "--zero", "3",
                 "--activation-checkpointing", "auto", "--memory-budget", "0.5"]) == 0
    assert json.loads((run / "activation_checkpointing.json").read_text())["names"]
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])


def test_fp8_experts_stay_fp8_under_expert_parallelism(tmp_path):
    """EP swaps the experts module out; the FP8 kernel must still compute the local experts. The first
    step's loss (forward only: row-wise activation tiles, per-expert weight blocks, nothing that depends on
    row order) equals the single-process FP8 run's, and is measurably not the BF16 one."""
    def first_loss(name, precision, *flags):
        assert main(["train", *SMALL, "--precision", precision, "--steps", "1", "--eval-every", "0",
                     "--run-dir", str(tmp_path / name), *flags]) == 0
        return read_metrics(tmp_path / name)[0]["loss"]

    fp8, bf16 = first_loss("fp8", "fp8"), first_loss("bf16", "bf16")
    ep = first_loss("ep", "fp8", "--nproc", "2", "--ep", "2")
    assert abs(ep - fp8) < 1e-5 and abs(ep - bf16) > 1e-4, (ep, fp8, bf16)


def test_fp8_dispatch_through_the_cli_logs_the_bytes_it_saves(tmp_path, capfd):
    """`--ep-dispatch fp8` reaches the EP modules: the logged dispatch bytes are 68 per row crossing ranks
    (64 FP8 values + one fp32 scale; rows counted by the fp32 combine, 256 B each), and the loss moves
    by the quantisation only. Without --ep the flag is a one-line error."""
    single, run = tmp_path / "single", tmp_path / "fp8"
    assert main(["train", *SMALL, "--steps", "2", "--eval-every", "0", "--run-dir", str(single)]) == 0
    assert main(["train", *SMALL, "--steps", "2", "--eval-every", "0", "--run-dir", str(run), "--nproc", "2",
                 "--ep", "2", "--ep-dispatch", "fp8"]) == 0
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        assert 0 < abs(a["loss"] - b["loss"]) < 1e-2, (a["loss"], b["loss"])
        assert a["ep_combine_bytes"] > 0 and a["ep_combine_bytes"] % 256 == 0
        assert a["ep_dispatch_bytes"] == a["ep_combine_bytes"] // 256 * 68
    capfd.readouterr()
    assert main(["train", *SMALL, "--steps", "1", "--run-dir", str(tmp_path / "x"), "--ep-dispatch", "fp8"]) == 2
    err = capfd.readouterr().err
    assert "ep_dispatch=fp8 needs ep > 1" in err and err.count("\n") == 1, err
