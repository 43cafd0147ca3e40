"""`moeforge report` and `moeforge balance plan` as a user runs them."""

import json

import pytest

from conftest import SMALL_CORPUS
from moeforge.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "4",
                 "--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--sample-tokens", "0",
                 "--device", "cpu", "--run-dir", str(run)]) == 0
    return run


def test_report_summarises_and_plots(run_dir, capsys):
    assert main(["report", str(run_dir), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "MaxVio/layer" in out
    for name in ("loss.png", "expert_load.png"):
        png = run_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_balance_plan_from_a_run_and_from_json(run_dir, tmp_path, capsys):
    assert main(["balance", "plan", "--loads", str(run_dir / "metrics.jsonl"), "--slots", "10", "--gpus", "2"]) == 0
    assert "balancedness" in capsys.readouterr().out
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([[100, 10, 10, 10, 10, 10, 10, 10], [1, 1, 1, 1, 1, 1, 1, 50]]))
    assert main(["balance", "plan", "--loads", str(loads), "--slots", "12", "--gpus", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["phy2log"]) == 2 and len(out["phy2log"][0]) == 12
    assert out["logcnt"][0][0] > 1 and out["logcnt"][1][7] > 1  # the hot experts were replicated
    assert len(out["device_load"][0]) == 4
    for layer in range(2):  # slot s lives on device s // 3
        per_device = [0.0] * 4
        for s, e in enumerate(out["phy2log"][layer]):
            per_device[s // 3] += json.loads(loads.read_text())[layer][e] / out["logcnt"][layer][e]
        assert per_device == pytest.approx(out["device_load"][layer])


@pytest.mark.parametrize("content, message", [
    ("[1, 2", "not valid JSON"), ("{}", "per-layer lists"), ("[[1, 2], [1]]", "same number"),
])
def test_bad_loads_files(tmp_path, capsys, content, message):
    f = tmp_path / "loads.json"
    f.write_text(content)
    assert main(["balance", "plan", "--loads", str(f), "--slots", "4", "--gpus", "2"]) == 2
    assert message in capsys.readouterr().err


def test_report_on_a_folder_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
