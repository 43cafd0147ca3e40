"""`moeforge plan` and `moeforge compare-kv` as a user meets them."""

import json

import pytest

from moeforge.cli import main

SMALL = ["plan", "--model", "deepseek-v2-lite", "--hardware", "h100", "--gpus", "16", "--seq", "4096",
         "--global-batch", "256"]


def test_compare_kv_prints_the_published_table(capsys):
    assert main(["compare-kv"]) == 0
    out = capsys.readouterr().out
    for figure in ("70.272", "327.680", "516.096"):
        assert figure in out
    assert main(["compare-kv", "--json", "deepseek-v3", "llama3.1-405b"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kv_cache_bytes_per_token"] for r in rows] == [70_272, 516_096]


def test_plan_json_carries_the_required_fields(capsys):
    assert main(SMALL + ["--json", "--top", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "train_flops_per_token", "kv_cache_bytes_per_token",
                "memory_per_gpu_bytes", "step_time_s", "tokens_per_s", "mfu", "tpot_s", "layout"):
        assert key in d
    assert set(d["layout"]) >= {"dp", "tp", "pp", "ep", "zero", "schedule"}
    assert len(d["ranked"]) == 3 and d["memory_fits"]
    assert d["memory_per_gpu_bytes"] <= 80e9


def test_plan_table_layout_and_plot(capsys, tmp_path):
    out_png = tmp_path / "plan.png"
    assert main(SMALL + ["--layout", "dp=16,ep=16,zero=1", "--set", "overlap=0.5", "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "DP16 TP1 PP1 EP16 ZeRO-1" in out and "TPOT" in out and "Best layout" in out
    assert out_png.stat().st_size > 10_000


@pytest.mark.parametrize("extra, message", [
    (["--hardware", "h900"], "unknown hardware 'h900'; choose one of: a100"),
    (["--layout", "dp=1,tp=16"], "tp=16 exceeds the 8 GPUs of a node"),
    (["--layout", "dp=16,ep=5"], "valid ep: 1, 2, 4, 8, 16, 32, 64"),
    (["--layout", "dp=32"], "32 ranks, but there are 16 GPUs"),
    (["--set", "speed=3"], "unknown field(s) speed"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--layout", "dp=16,schedule=zb"], "choose one of: 1f1b, interleaved-1f1b, dualpipe"),
    (["--layout", "dp=16,tpp=2"], "--layout expects KEY=VALUE pairs"),
])
def test_errors_are_one_line(extra, message, capsys):
    code = main(SMALL + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("moeforge plan")


def test_calibration_trace_counts_the_matmuls_costs_predicts():
    """The traced step's matmul FLOPs equal `costs`' analytic count (MTP included) once eager attention's
    full T x T score matrix (the analytic count takes the causal half) is added: the trace sees the real
    model and the cost model describes it."""
    from moeforge.config import preset
    from moeforge.costs import training_flops_per_token
    from moeforge.plan.calibrate import trace_step

    cfg, batch, seq = preset("debug"), 2, 64
    trace = trace_step(batch, seq, "fp32", preset="debug")
    tokens = batch * seq
    analytic = training_flops_per_token(cfg, seq, include_mtp=True) * tokens
    attention_half = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq / 2)
    eager_extra = 3 * attention_half * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * tokens
    assert trace.matmul_flops() == pytest.approx(analytic + eager_extra, rel=0.01)
    assert trace.other_ops > 100 and trace.other_bytes > 0

    # The planner's analytic eager op list (plan/ops.py, what `plan --against` prices) against the same
    # traced step: the same matmul FLOPs and, within its stated approximation (docs/planner.md), as many
    # element-wise kernels and bytes.
    from moeforge.config import resolve_run_config
    from moeforge.plan.against import run_layout
    from moeforge.plan.models import from_moe
    from moeforge.plan.ops import EAGER, step_ops, summarize

    run = resolve_run_config({}, dict(preset="debug", batch_size=batch, seq_len=seq, device="cpu", precision="fp32"))
    lo, s = run_layout(run, 1)
    ops = step_ops(from_moe(run.model, "debug"), lo, s, EAGER)
    totals = summarize(ops, 1)
    assert totals["flops"] == pytest.approx(trace.matmul_flops(), rel=0.02)
    kernels = sum(o.kernels * o.count for o in ops if o.kind == "memory")
    assert 0.6 < kernels / trace.other_ops < 1.5
    assert 0.5 < totals["memory_bytes"] / trace.other_bytes < 1.5
