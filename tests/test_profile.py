"""`moeforge profile`: the step breakdown (checked by hand on a synthetic trace) and real 2-rank gloo runs."""

import json
import pytest

from conftest import SMALL_CORPUS, small_run
from moeforge.cli import main
from moeforge.profile.analyze import analyze, extract

US = 1e-6


def _trace(pid: int, events: list[tuple]) -> dict:
    """events: (name, start µs, end µs, thread) -> a Chrome trace as torch.profiler writes it."""
    return {"host_name": "h", "traceEvents": [{"ph": "X", "name": n, "ts": s, "dur": e - s, "pid": pid, "tid": t}
                                              for n, s, e, t in events]}


def test_breakdown_of_a_synthetic_two_rank_trace():
    """Rank 1 reaches the EP combine late (310 µs vs 120 µs); both overlap an FSDP all-gather with compute."""
    main, worker = 1, 2
    rank0 = _trace(10, [("moeforge.profile.step", 0, 1000, main), ("moeforge.ep.combine", 100, 150, main),
                        ("_c10d_functional::wait_tensor", 150, 400, main), ("gloo:all_to_all", 120, 400, worker),
                        ("FSDP::all_gather", 500, 510, main), ("gloo:all_gather", 505, 600, worker)])
    rank1 = _trace(11, [("moeforge.profile.step", 0, 1000, main), ("moeforge.ep.combine", 300, 320, main),
                        ("_c10d_functional::wait_tensor", 320, 400, main), ("gloo:all_to_all", 310, 400, worker),
                        ("FSDP::all_gather", 500, 510, main), ("gloo:all_gather", 505, 600, worker)])
    result = analyze([extract(rank0, 0), extract(rank1, 1)])
    r0, r1 = (r["steps"][0] for r in result["ranks"])
    # rank 0: blocked 150-400, of which 150-310 waiting for rank 1; transfer 310-400 exposed, 505-600 hidden
    assert r0["compute_s"] == pytest.approx(750 * US) and r0["exposed_comm_s"] == pytest.approx(90 * US)
    assert r0["idle_s"] == pytest.approx(160 * US) and r0["waiting_s"] == pytest.approx(160 * US)
    assert r0["hidden_comm_s"] == pytest.approx(95 * US) and r0["overlap_ratio"] == pytest.approx(95 / 185)
    # rank 1: blocked 320-400 (exposed); its transfer 310-320 and 505-600 ran under compute
    assert r1["compute_s"] == pytest.approx(920 * US) and r1["exposed_comm_s"] == pytest.approx(80 * US)
    assert r1["idle_s"] == pytest.approx(0) and r1["hidden_comm_s"] == pytest.approx(105 * US)
    for r in (r0, r1):
        assert r["compute_s"] + r["exposed_comm_s"] + r["idle_s"] == pytest.approx(r["step_s"])
    assert r0["comm_by_dimension"]["ep_combine"] == pytest.approx(
        {"total_s": 90 * US, "hidden_s": 0.0, "exposed_s": 90 * US})
    assert r0["comm_by_dimension"]["dp"] == pytest.approx({"total_s": 95 * US, "hidden_s": 95 * US, "exposed_s": 0.0})
    assert result["overlap_ratio"] == pytest.approx(200 / 370)
    assert result["straggler"]["rank"] == 1
    assert result["straggler"]["others_wait_s_per_step"] == pytest.approx(160 * US)


def _check_profile(profile: dict, world: int, dims_expected=("ep_dispatch", "ep_combine", "ep_backward", "dp")) -> None:
    for key in ("ranks", "overlap_ratio", "straggler", "prediction", "comparison", "layout", "traces"):
        assert key in profile
    assert len(profile["ranks"]) == world
    for rank in profile["ranks"]:
        for step in rank["steps"]:
            for key in ("step_s", "clock_step_s", "compute_s", "comm_s", "hidden_comm_s", "exposed_comm_s", "idle_s",
                        "waiting_s", "overlap_ratio", "comm_by_dimension", "comm_by_collective"):
                assert key in step
            parts = step["compute_s"] + step["exposed_comm_s"] + step["idle_s"]
            assert abs(parts - step["clock_step_s"]) <= 0.1 * step["clock_step_s"]  # vs a clock, not the trace
            assert 0 <= step["overlap_ratio"] <= 1
    assert 0 <= profile["overlap_ratio"] <= 1
    dims = profile["ranks"][0]["mean"]["comm_by_dimension"]
    assert set(dims_expected) <= set(dims)


# Top-1 routing with 7/8 of the tokens on expert 0 (hot:7, the most F < E allows): EP rank 0 computes 53/56
# of the routed rows, rank 1 4/56. With 1024 tokens a step and experts 2048 wide those rows are most of
# rank 0's compute: measured alone, rank 1 waits ~270 ms of a ~690 ms step and rank 0 ~40 ms; with two
# busy-loop processes beside it (what a second xdist worker does) 210-320 ms against 41-47 ms. 256 tokens
# and 4096-wide experts (the first version) left a ~95 ms margin, which one CI run's noise overturned.
HOT = ["--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "32", "--device", "cpu",
       "--precision", "fp32", "-m", "moe_intermediate_size=2048", "-m", "num_experts_per_tok=1", "--hardware", "h100",
       "--dist-timeout", "120"]


def test_profile_two_gloo_ranks_names_the_hot_rank_as_straggler(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", *HOT, "--nproc", "2", "--ep", "2", "--routing", "hot:7", "--steps", "3", "--warmup", "1",
                 "--out", str(out)]) == 0
    profile = json.loads((out / "profile.json").read_text())
    _check_profile(profile, world=2)
    # The cause, counted (no timing): 53/56 of the routed rows on rank 0's experts.
    rows = [r["expert_rows_per_step"] for r in profile["ranks"]]
    assert rows[0] > 10 * rows[1] > 0, rows
    # The effect, measured: rank 1 waits for rank 0, never the reverse by as much.
    assert profile["straggler"]["rank"] == 0  # expert 0, the hot one, lives on EP rank 0
    assert (out / "trace" / "rank0.json").is_file() and (out / "trace" / "rank1.json").is_file()
    assert (out / "timeline.png").stat().st_size > 1000
    assert "prediction" in profile and "parts_s" in profile["prediction"]
    printed = capsys.readouterr().out
    assert "straggler: rank 0" in printed and "compute + exposed comm + idle = step" in printed


def test_tensor_parallel_communication_is_attributed_to_tp(tmp_path):
    """DTensor's redistributes (the row-parallel all-reduces, forward and backward) run functional
    collectives on the tp mesh group: they are labelled "tp", not folded into whatever range came before."""
    out = tmp_path / "tp"
    assert main(["profile", "--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "16", "--batch-size", "2",
                 "--device", "cpu", "--precision", "fp32", "--hardware", "h100", "--dist-timeout", "120",
                 "--nproc", "2", "--tp", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    profile = json.loads((out / "profile.json").read_text())
    _check_profile(profile, world=2, dims_expected=("tp",))
    for rank in profile["ranks"]:
        dims = rank["mean"]["comm_by_dimension"]
        others = sum(v["total_s"] for d, v in dims.items() if d != "tp")
        assert dims["tp"]["total_s"] > others, dims  # tens of all-reduces vs a few bookkeeping ones
    row = next(r for r in profile["comparison"] if r["component"] == "TP all-reduce (exposed)")
    assert row["measured_s"] > 0
    # The planner's op list has the collectives the traced step ran on the tp group, one for one: DTensor's
    # column-parallel modules each sum their input gradient, the vocabulary-parallel embedding and head
    # (logits all-gathered), the gradient norm (docs/planner.md).
    traced = [e["name"] for e in json.loads((out / "trace" / "rank0.json").read_text())["traceEvents"]
              if e.get("ph") == "X" and e.get("name", "").startswith("moeforge.comm.tp.")]
    assert len(traced) == _planned_collectives(out / "run", "tp") == 36, sorted(set(traced))


def _planned_collectives(run_dir, group: str) -> float:
    """Collectives a step of the run in `run_dir` issues on `group`, by the planner's eager op list."""
    from moeforge.config import load_toml, resolve_run_config
    from moeforge.plan.against import run_layout
    from moeforge.plan.layout import micro_batches
    from moeforge.plan.models import from_moe
    from moeforge.plan.ops import EAGER, step_ops

    run = resolve_run_config(load_toml(run_dir / "config.toml"))
    lo, s = run_layout(run, 2)
    m = micro_batches(lo, s)
    return sum(op.count * (1 if op.phase == "step" else m) for op in step_ops(from_moe(run.model, run.train.preset), lo, s, EAGER)
               if op.kind == "collective" and op.group == group)


def test_ep_overlap_shared_hides_more_of_the_dispatch(tmp_path):
    """The shared experts computed while the dispatch all-to-all is in flight: more of the dispatch hidden.
    Measured on the EP dispatch, which the flag changes (it also holds the counts exchange, always exposed);
    the overall ratio is dominated by FSDP's traffic and the machine's noise."""
    ratios = {}
    for flag in ("--ep-overlap-shared", "--no-ep-overlap-shared"):
        out = tmp_path / flag
        assert main(["profile", "--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size",
                     "4", "--device", "cpu", "--precision", "fp32", "-m", "n_shared_experts=8", "-m",
                     "moe_intermediate_size=256", "--hardware", "h100", "--dist-timeout", "120", "--nproc", "2",
                     "--ep", "2", flag, "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
        profile = json.loads((out / "profile.json").read_text())
        _check_profile(profile, world=2)
        dims = [r["mean"]["comm_by_dimension"]["ep_dispatch"] for r in profile["ranks"]]
        ratios[flag] = sum(d["hidden_s"] for d in dims) / sum(d["total_s"] for d in dims)
    assert ratios["--ep-overlap-shared"] > ratios["--no-ep-overlap-shared"], ratios


@pytest.mark.parametrize("flags, message", [
    (["--run-dir", "x"], "--run-dir: not used by profile"), (["--steps", "0"], "--steps must be >= 1"),
    (["--ep", "2"], "needs several processes")])
def test_profile_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["profile", "--preset", "debug", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cpu_prediction_takes_the_runs_processes_as_one_node(tmp_path):
    """`moeforge profile` on CPU predicts with this machine as one node of the run's ranks: a TP 2 run is
    priced, not refused because TP must stay inside a node."""
    from moeforge.profile.predict import predict

    run = small_run(tmp_path, tp=2, nproc=2)
    layout = {"dp": 1, "tp": 2, "pp": 1, "ep": 1, "zero": 0, "micro_batch": 4}
    out = predict(run, layout, world=2, hardware="cpu")
    assert "error" not in out, out
    assert out["parts_s"]["TP all-reduce"] > 0 and out["total_s"] > 0
