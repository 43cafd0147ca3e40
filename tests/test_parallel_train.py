"""`moeforge train --nproc 2 --ep 2` as a user runs it: torchrun is launched, one rank reports, the
logged (global) loss equals a single-process run's on the same global batch, and the distributed
checkpoint resumes in one process and continues that run exactly."""

import json
import os

import pytest

from conftest import SMALL_CORPUS
from moeforge.cli import main
from parallel_helpers import one_thread

SMALL = ["--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "4",
         "--eval-batches", "2", "--eval-every", "2", "--sample-tokens", "0", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_run_matches_single_process_and_resumes_in_one(tmp_path, capfd):
    single, dist_run = tmp_path / "single", tmp_path / "dist"
    assert main(["train", *SMALL, "--steps", "6", "--run-dir", str(single)]) == 0
    capfd.readouterr()
    env_before = dict(os.environ)
    assert main(["train", *SMALL, "--steps", "4", "--save-every", "2", "--nproc", "2", "--ep", "2",
                 "--run-dir", str(dist_run)]) == 0
    err = capfd.readouterr().err
    assert err.count("moeforge train ->") == 1 and "dp 2 (ep 2 x edp 1)" in err  # rank 0 only
    assert dict(os.environ) == env_before  # the launcher leaves this process as it was
    ckpt = dist_run / "checkpoints" / "step-000004"
    assert (ckpt / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()

    # The same run folder continues in one process: pass the new layout; the checkpoint reshards.
    assert main(["train", "--resume", "--run-dir", str(dist_run), "--steps", "6", "--ep", "1"]) == 0
    want, got = metrics(single), metrics(dist_run)
    assert [m["step"] for m in got] == list(range(1, 7))  # one line per step: only rank 0 wrote
    for a, b in zip(got, want):
        for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
        assert a["expert_counts"] == b["expert_counts"]
