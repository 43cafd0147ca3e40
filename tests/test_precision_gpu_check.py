"""benchmarks/gpu_check.sh and its driver, on CPU: no GPU here, so the driver runs at toy sizes
(`--device cpu --dry-run`) and must print its whole table; the shell entry point must refuse with one
line when there is no CUDA device."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeforge import hardware

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

# The real probe times bf16 matmuls (seconds on a busy CPU); the driver only needs its answers.
CAPS = hardware.Capabilities(device="cpu", bf16=True, grouped_mm=True, fp8_matmul=True, fused_attention=True,
                             dist_backend="gloo", expert_impl="grouped_mm", attn_impl="eager")


@pytest.fixture
def cpu_caps(monkeypatch):
    monkeypatch.setattr(hardware, "probe", lambda device="auto": dataclasses.replace(CAPS, device=device))


def test_dry_run_on_cpu_prints_every_section_of_the_summary_table(cpu_caps, capsys):
    assert gpu_check.main(["--device", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("section "):].splitlines()[1:]
    rows = [line.split()[:2] + [line] for line in table]
    sections = {r[0] for r in rows}
    assert sections == {"tests", "fp8", "experts", "train", "decode"}
    for gemm in ("fprop", "dgrad", "wgrad"):  # each FP8 GEMM checked against the emulation, and passing
        assert sum(f"rowwise {gemm}" in r[2] and " ok " in r[2] for r in rows) == 2
    train = [r[2] for r in rows if r[0] == "train"]
    assert any("bf16 step" in t and "tok/s" in t and "MFU" in t for t in train)
    assert any("fp8 rowwise step" in t for t in train)
    assert any("tok/s" in r[2] for r in rows if r[0] == "decode")


def test_a_wrong_fp8_kernel_is_reported_as_failed(cpu_caps, capsys, monkeypatch):
    real = gpu_check.fp8_mm
    monkeypatch.setattr(gpu_check, "fp8_mm", lambda a, b, c, t, backend="emulated":
                        real(a, b, c, t, backend) * (1.01 if backend != "emulated" else 1.0))
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--sections", "fp8"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "rowwise fprop" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_the_script_and_the_driver_stop_with_one_line(capsys):
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr
    assert gpu_check.main(["--device", "cuda"]) == 2  # a machine with nvidia-smi but no CUDA torch
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no CUDA GPU" in err


def test_the_time_limit_still_prints_the_finished_sections(cpu_caps, capsys, monkeypatch):
    def over_time(device, dry):
        raise KeyboardInterrupt  # what gpu_check.sh's `timeout --signal=INT` delivers

    monkeypatch.setitem(gpu_check.SECTIONS, "experts", over_time)
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--sections", "fp8,experts,decode"]) == 1
    out = capsys.readouterr().out
    assert "rowwise wgrad" in out and "interrupted: over the time limit" in out and "decode " not in out
