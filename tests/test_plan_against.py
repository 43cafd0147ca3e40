"""`moeforge plan --against RUN_DIR`: a real (tiny) run of the trainer, predicted on this machine.

The bound is loose on purpose: it guards the composition (op list x measured device) against
regressions such as a dropped backward or a doubled layer, not the accuracy, which the validation
table of benchmarks/planner_validation.py measures (docs/planner.md). Timings are not asserted
beyond that factor."""

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import small_run
from moeforge.cli import main
from moeforge.plan.against import compare
from moeforge.plan.layout import Layout


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """A 5-step debug run, and the CPU share it got (CPU seconds over wall seconds: the machine is
    shared, and a step's wall time is its CPU time over that share)."""
    from rich.console import Console

    from moeforge.config import resolve_run_config
    from moeforge.train import Trainer

    run_dir = tmp_path_factory.mktemp("against") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the validation runs: one thread per process (docs/planner.md)
    try:
        run = resolve_run_config({}, dict(preset="debug", steps=5, batch_size=8, seq_len=128, eval_every=0,
                                          eval_batches=1, sample_tokens=0, max_corpus_mb=0.2, device="cpu",
                                          precision="fp32", run_dir=str(run_dir)))
        trainer = Trainer(run, run_dir=run_dir, console=Console(quiet=True))
        c0, w0 = time.process_time(), time.perf_counter()  # the training loop only, not the setup
        trainer.fit()
        share = min(1.0, (time.process_time() - c0) / (time.perf_counter() - w0))
    finally:
        torch.set_num_threads(threads)
    return run_dir, share


def test_against_predicts_a_finished_run_within_a_loose_factor(debug_run, capsys, tmp_path, monkeypatch):
    debug_run, share = debug_run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # GEMM timings cached here, not in ~/.cache
    # a torn last line (a run killed while writing) is dropped with a warning, not an error
    with open(debug_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1, "tokens_per')
    assert main(["plan", "--against", str(debug_run), "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert "torn last line" in captured.err
    assert r["processes"] == 1 and r["layout"].startswith("DP1 TP1 PP1 EP1")
    assert r["steps_timed"] == 5
    r = compare(debug_run, threads=1)  # the share the run's own step clock recorded (cpu_s, runq_s)
    assert r["share_source"] == "run" and 0 < r["cpu_share_during_run"] <= 1
    assert 1 / 3 < r["predicted_s"] / r["measured_s"] < 3
    assert 1 / 3 < r["predicted_cpu_s"] / r["measured_cpu_s"] < 3  # CPU seconds: loose, a guard (0.5 seen under load 20)
    rows = [json.loads(line) for line in (debug_run / "metrics.jsonl").read_text().splitlines()[:-1]]
    for row in rows:  # wall = CPU + run-queue delay (+ blocked, none in one process), up to clock noise
        assert row["cpu_s"] + row["runq_s"] <= 1.2 * (8 * 128 / row["tokens_per_s"]) + 0.05
        assert isinstance(row["minflt"], int) and row["minflt"] >= 0  # page faults of the step's thread
    assert r["by_kind"]["gemm"] > 0 and r["by_kind"]["memory"] > 0 and r["by_kind"]["attention"] > 0
    assert sum(r["parts"].values()) == pytest.approx(r["predicted_s"])
    assert (tmp_path / "moeforge" / "plan-cpu.json").is_file()  # measured shapes are kept
    assert main(["plan", "--against", str(debug_run), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "predicted" in text and "measured" in text and "error" in text and "memory per rank" in text


@pytest.mark.parametrize("args, message", [
    (["--against", "/nonexistent/run"], "not a run folder"),
    (["--threads", "2"], "use them with --against"),
])
def test_against_errors_are_one_line(args, message, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_rank0_expert_load_is_read_from_the_runs_expert_counts(tmp_path):
    """Rank 0 runs the first E/ep experts: its load is their share of the logged routed tokens x ep,
    over the timed steps (the first two are warm-up)."""
    from moeforge.config import resolve_run_config
    from moeforge.plan.against import RunRecord

    run = resolve_run_config({}, dict(preset="debug", ep=2, nproc=2))
    warm, timed = [[[9, 9, 0, 0]]] * 2, [[[3, 3, 1, 1], [2, 2, 2, 2]]] * 3  # layers x 4 experts
    rec = RunRecord(tmp_path, run, [1.0] * 5, None, 2, expert_counts=warm + timed)
    assert rec.rank0_expert_load(2) == pytest.approx((6 + 4) * 2 / (8 + 8))
    assert rec.rank0_expert_load(1) == 1.0
    assert RunRecord(tmp_path, run, [1.0] * 5, None, 2).rank0_expert_load(2) == 1.0


def test_ranks_sharing_the_machine_price_memory_ops_at_the_bandwidth_measured_beside_their_peers(monkeypatch):
    """A rank of an N-process run streams beside min(N, cores / threads) - 1 peers: its element-wise ops
    get the co-run bandwidth; a single process keeps the bandwidth measured alone."""
    from moeforge.plan import device as dev

    rates = (("elementwise_bw", 16e9), ("dispatch_s", 1e-6), ("socket_bw", 1e9), ("socket_latency_s", 1e-5),
             ("share", 1.0))
    calls = []
    monkeypatch.setattr(dev, "measured_rates", lambda threads: rates)
    monkeypatch.setattr(dev, "corun_bandwidth", lambda threads, peers: calls.append((threads, peers)) or 11e9)
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    assert dev.CPUDevice(threads=1, ranks=1).rates["elementwise_bw"] == 16e9
    four = dev.CPUDevice(threads=1, ranks=4)  # 4 ranks on 2 cores: one peer runs at a time
    assert four.rates["elementwise_bw"] == 11e9 and four.rates["elementwise_bw_alone"] == 16e9
    assert dev.CPUDevice(threads=2, ranks=2).corun_peers == 0  # each rank fills the machine alone
    assert calls == [(1, 1)]


def test_the_corun_probe_measures_beside_real_peers_and_leaves_none_behind():
    import multiprocessing as mp

    from moeforge.plan.device import measure_corun_bandwidth

    bw = measure_corun_bandwidth(threads=1, peers=1, mb=1.0, rounds=2)
    assert 1e8 < bw < 1e12  # bytes per second, finite
    assert not mp.active_children()


def test_local_collectives_are_priced_from_gloos_own_measured_collectives(monkeypatch):
    """gloo's collectives cost 3-10x what a ring formula over its send/recv gives, so a local run of
    several processes prices each collective from that collective's own alpha-beta (at two ranks, the
    bytes term scaled to p ranks as a ring's share); pipeline sends and one-process devices keep the
    link model."""
    from moeforge.plan import device as dev
    from moeforge.plan.ops import Op
    from moeforge.plan.steptime import local_collective_time

    rates = (("elementwise_bw", 16e9), ("dispatch_s", 1e-6), ("socket_bw", 1e9), ("socket_latency_s", 1e-5),
             ("share", 1.0))
    monkeypatch.setattr(dev, "measured_rates", lambda threads: rates)
    monkeypatch.setattr(dev, "corun_bandwidth", lambda threads, peers: 11e9)
    fits = {"all_reduce": {"alpha": 2e-4, "beta": 1e9}, "all_to_all": {"alpha": 1e-4, "beta": 2e9}}
    monkeypatch.setattr(dev.CPUDevice, "gloo", lambda self: {"collectives": fits})
    d = dev.CPUDevice(threads=1, ranks=4)
    assert d.collective_seconds("all_reduce", 1e6, 2) == pytest.approx(2e-4 + 1e6 / 1e9)
    assert d.collective_seconds("all_reduce", 1e6, 4) == pytest.approx(3 * 2e-4 + 1e6 * 1.5 / 1e9)
    assert d.collective_seconds("reduce_scatter", 1e6, 2) is None  # not measured: the network model
    lo = Layout(dp=4, ep=4)
    a2a = Op("moe.ep.dispatch", "collective", "fwd", m=100, n=8, k=2, bytes=3200, collective="moe_a2a",
             group="ep")
    t, algo = local_collective_time(d, a2a, lo)
    assert algo == "gloo (measured)" and t == pytest.approx(3 * 1e-4 + 6400 * 1.5 / 2e9)
    assert local_collective_time(d, Op("pp.send", "collective", "fwd", bytes=1e6, collective="p2p",
                                       group="pp"), Layout(pp=2)) is None
    assert local_collective_time(dev.CPUDevice(threads=1, ranks=1), a2a, lo) is None


def test_ranks_wait_for_each_other_at_every_collective_by_the_measured_skew(monkeypatch, tmp_path):
    """A local run of several processes pays, per step, the measured wait at one collective (sync_skew.py)
    for each collective its ranks meet at (pipeline sends excepted: the bubble), at the mean segment of
    work between them. Debug under TP2 meets 37 times: 4 blocks x (2 forward + 5 backward all-reduces),
    the embedding's 2 (the model's and the MTP's), 2 heads x (logits all-gather + input gradient), the
    gradient norm's 2 and the non-finite check; its one-rank data-parallel group meets nobody."""
    from moeforge.config import preset
    from moeforge.plan import device as dev
    from moeforge.plan import network as net
    from moeforge.plan.against import local_cpu_hardware
    from moeforge.plan.layout import TrainSettings
    from moeforge.plan.models import from_moe
    from moeforge.plan.steptime import step_time
    from moeforge.plan.sync_skew import wait_per_sync

    rates = (("elementwise_bw", 16e9), ("dispatch_s", 1e-6), ("socket_bw", 1e9), ("socket_latency_s", 1e-5),
             ("share", 1.0))
    monkeypatch.setattr(dev, "measured_rates", lambda threads: rates)
    monkeypatch.setattr(dev, "corun_bandwidth", lambda threads, peers: 11e9)
    monkeypatch.setattr(dev, "measure_gemm", lambda m, n, k, g, dtype, threads: 2 * g * m * n * k / 1e11)
    monkeypatch.setattr(dev, "_measure_bmm", lambda g, m, n, k, dtype, threads: 2 * g * m * n * k / 1e11)
    fits = {c: {"alpha": 2e-4, "beta": 1e9} for c in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")}
    monkeypatch.setattr(dev.CPUDevice, "gloo", lambda self: {"collectives": fits})
    monkeypatch.setattr(dev, "_cache_path", lambda: tmp_path / "plan-cpu.json")
    skew = {"lengths_s": [0.001, 0.01], "wait_s": [2e-4, 1e-3], "alone_s": 5e-4}
    model = from_moe(preset("debug"), "debug")
    s = TrainSettings(seq_len=64, global_batch=2, precision="fp32")
    lo = Layout(tp=2)

    def run(ranks):
        d = dev.CPUDevice(threads=1, ranks=ranks, run_share=1.0, skew=skew)
        topo = net.Topology("nvswitch", 2, 2, net.Link(1e9, 2e-4), net.Link(1e9, 2e-4))
        return step_time(model, local_cpu_hardware(d), topo, lo, s, device=d)

    st = run(2)
    assert st.sync_wait == pytest.approx(37 * wait_per_sync(skew, st.compute / 37))
    assert st.sync_wait > 0 and st.parts()["waiting for peers at collectives"] == st.sync_wait
    assert sum(st.parts().values()) == pytest.approx(st.total)
    assert run(1).sync_wait == 0  # one process waits for nobody


def test_the_skew_probe_times_real_gloo_peers_and_interpolates():
    import multiprocessing as mp

    from moeforge.plan.sync_skew import measure_sync_skew, wait_per_sync

    r = measure_sync_skew(2, work_s=0.01)
    assert r["lengths_s"] == sorted(r["lengths_s"]) and len(r["wait_s"]) == len(r["lengths_s"])
    assert all(w >= 0 for w in r["wait_s"]) and r["alone_s"] > 0  # a gloo all-reduce blocks for its peer
    assert not mp.active_children()
    table = {"lengths_s": [0.01, 0.02], "wait_s": [1e-3, 3e-3]}
    assert wait_per_sync(table, 0.005) == pytest.approx(5e-4)  # from no wait at no work
    assert wait_per_sync(table, 0.015) == pytest.approx(2e-3)
    assert wait_per_sync(table, 1.0) == 3e-3  # held beyond the longest segment measured


def test_eager_softmax_and_swiglu_are_timed_at_their_shapes_not_priced_by_their_bytes(monkeypatch, tmp_path):
    """Eager attention's row softmax over [B*H, T, T] and SwiGLU's silu(gate) * up are exp-bound: a
    measured device times them at their shapes (forward and backward; a recomputed forward as a forward),
    as it times GEMMs; the bytes stay on the op for devices without it."""
    from moeforge.config import preset
    from moeforge.plan import device as dev
    from moeforge.plan.layout import TrainSettings
    from moeforge.plan.models import from_moe
    from moeforge.plan.ops import EAGER, FUSED, step_ops

    rates = (("elementwise_bw", 16e9), ("dispatch_s", 1e-6), ("socket_bw", 1e9), ("socket_latency_s", 1e-5),
             ("share", 1.0))
    monkeypatch.setattr(dev, "measured_rates", lambda threads: rates)
    monkeypatch.setattr(dev, "_cache_path", lambda: tmp_path / "plan-cpu.json")
    timed = []
    monkeypatch.setattr(dev, "measure_softmax", lambda g, m, n, phase, threads: timed.append((g, m, n, phase)) or 0.01)
    model = from_moe(preset("debug"), "debug")
    s = TrainSettings(seq_len=64, global_batch=2, precision="fp32")
    ops = [op for op in step_ops(model, Layout(micro_batch=2), s, EAGER) if op.timed == "softmax"]
    heads = preset("debug").num_attention_heads
    assert ops and all((op.groups, op.m, op.n) == (2 * heads, 64, 64) for op in ops)
    assert {op.phase for op in ops} == {"fwd", "bwd"} and all(op.bytes > 0 for op in ops)
    d = dev.CPUDevice(threads=1, ranks=1, run_share=1.0)
    assert d.op_time(ops[0]) == 0.01 and timed[0][:3] == (2 * heads, 64, 64)
    assert not [op for op in step_ops(model, Layout(), s, FUSED) if op.timed]  # fused kernels: by their bytes

    swiglu = []
    monkeypatch.setattr(dev, "measure_swiglu", lambda m, n, phase, dtype, threads: swiglu.append((m, n, phase)) or 0.02)
    cfg = preset("debug")
    ops = [op for op in step_ops(model, Layout(micro_batch=2, recompute="selective"), s, EAGER) if op.timed == "swiglu"]
    shapes = {(op.m, op.n) for op in ops}
    assert (128, cfg.intermediate_size) in shapes  # the dense MLP over its 2 x 64 tokens
    assert (128 * cfg.num_experts_per_tok, cfg.moe_intermediate_size) in shapes  # the routed experts' rows
    recomputed = [op for op in ops if op.name.endswith(".recompute")]
    assert recomputed and all(op.phase == "bwd" for op in recomputed)
    for op in recomputed:
        assert d.op_time(op) == 0.02 and swiglu[-1][2] == "fwd"  # recomputation repeats the forward


def test_eager_host_work_is_measured_per_layer_where_the_arithmetic_is_negligible(tmp_path):
    """The trainer's Python and autograd work (host_cost.py) is measured on the run's own model at one
    sequence of 8 tokens, net of what the op list prices there; the eager op list carries one host op per
    layer, MTP module, pipeline end and step, which a measured CPU prices from that table and a GPU at 0."""
    from moeforge.plan.catalog import get_hardware
    from moeforge.plan.device import CPUDevice, GPUDevice
    from moeforge.plan.host_cost import SEQ, measure_host_cost
    from moeforge.plan.layout import TrainSettings
    from moeforge.plan.models import from_moe
    from moeforge.plan.ops import EAGER, FUSED, step_ops

    run = small_run(tmp_path)
    device = CPUDevice(threads=1, ranks=1, run_share=1.0)
    host = measure_host_cost(run, device, reps=3)
    cats = [f"{c}.{p}" for c in ("dense", "moe", "mtp", "ends") for p in ("fwd", "bwd")] + ["step"]
    assert set(cats) <= set(host) and all(host[k] >= 0 for k in cats)
    # the step at 1 x SEQ tokens is mostly host work: what the table holds is most of its measured time
    layers = run.model.first_k_dense_replace, run.model.num_hidden_layers - run.model.first_k_dense_replace
    per_step = (layers[0] * (host["dense.fwd"] + host["dense.bwd"]) + layers[1] * (host["moe.fwd"] + host["moe.bwd"])
                + run.model.num_nextn_predict_layers * (host["mtp.fwd"] + host["mtp.bwd"])
                + host["ends.fwd"] + host["ends.bwd"] + host["step"])
    assert 0.3 * host["measured_step_s"] < per_step <= host["measured_step_s"]
    assert host["priced_step_s"] < host["measured_step_s"] and SEQ == 8

    model = from_moe(run.model, "debug")
    s = TrainSettings(seq_len=64, global_batch=4, precision="fp32")
    ops = [op for op in step_ops(model, Layout(micro_batch=4), s, EAGER) if op.kind == "host"]
    names = [op.name for op in ops]
    assert names.count("dense.host") == 2 and names.count("moe.host") == 2 and "trainer.host" in names
    assert names.count("ends.host") == 2 and any(n.startswith("mtp0.") for n in names)
    device.host = host
    dense_fwd = next(op for op in ops if op.name == "dense.host" and op.phase == "fwd")
    assert device.op_time(dense_fwd) == pytest.approx(host["dense.fwd"] * device.slowdown)
    assert GPUDevice(get_hardware("h800")).op_time(dense_fwd) == 0.0
    full = [op for op in step_ops(model, Layout(micro_batch=4, recompute="full"), s, EAGER)
            if op.name == "dense.host.recompute"]
    assert full and device.op_time(full[0]) == device.op_time(dense_fwd)  # recomputation repeats the forward
    assert not [op for op in step_ops(model, Layout(micro_batch=4), s, FUSED) if op.kind == "host"]


def test_each_run_is_priced_with_the_wrappers_its_layout_applies():
    """FSDP2 (ZeRO-2 / ZeRO-3) over the dp ranks with the experts split over the ep ranks, TP's DTensors
    on their own; pipeline stages are not FSDP-wrapped (their dp ranks all-reduce), so none is priced."""
    from types import SimpleNamespace

    from moeforge.plan.against import wrapper_seconds

    calls = []

    class Device:
        def wrapper(self, preset, mode, world=1, ep=1):
            calls.append((mode, world, ep))
            return {"per_tensor_s": 1e-3, "tensors": 10}

        def save(self):
            pass

    rec = SimpleNamespace(run=SimpleNamespace(train=SimpleNamespace(preset="debug")))
    assert wrapper_seconds(rec, Layout(dp=4, ep=4, zero=2), Device()) == pytest.approx(0.01)
    assert wrapper_seconds(rec, Layout(dp=2, zero=3), Device()) == pytest.approx(0.01)
    assert wrapper_seconds(rec, Layout(tp=2), Device()) == pytest.approx(0.01)
    assert wrapper_seconds(rec, Layout(dp=2, pp=2, zero=0), Device()) == 0.0
    assert calls == [("fsdp2", 4, 4), ("zero3", 2, 1), ("tp", 1, 1)]


def test_the_wrapper_probe_wraps_as_the_trainer_does_over_real_ranks():
    """Two spawned gloo ranks, the debug model plain and wrapped by `parallel.parallelize` with the
    layout `moeforge train --nproc 2 --ep 2` resolves to; the wrapped step costs host work on top."""
    from moeforge.parallel import ParallelLayout
    from moeforge.plan.wrapper_cost import measure_wrapper_cost, wrapped_layout

    assert wrapped_layout("fsdp2", 2, ep=2) == ParallelLayout.resolve(2, ep=2, zero=2)
    assert wrapped_layout("zero3", 4) == ParallelLayout.resolve(4, zero=3)
    r = measure_wrapper_cost("debug", seq=8, batch=2, mode="fsdp2", world=2, ep=2)
    assert r["world"] == 2 and r["tensors"] == 64  # the plain debug model's parameter tensors
    assert r["sharded_s"] > 0 and r["plain_s"] > 0 and r["per_tensor_s"] >= 0
    with pytest.raises(ValueError, match="does not divide"):
        measure_wrapper_cost("debug", mode="fsdp2", world=2, ep=4)


def test_a_collectives_alpha_beta_fit_survives_a_stalled_small_message():
    """The latency is the smallest time measured: an 8-byte all-to-all that stalled (3.7 ms, against 0.7 ms
    at 1 MB; measured here) must not leave a bandwidth of 1e15 B/s behind."""
    from moeforge.plan.gloo_link import collective_fit

    normal = collective_fit({"8": 267e-6, "1048576": 1107e-6, "4194304": 6615e-6, "16777216": 16937e-6})
    assert normal["alpha"] == 267e-6
    assert normal["beta"] == pytest.approx(16777216 / (16937e-6 - 267e-6))  # the median of the three rates
    stalled = collective_fit({"8": 3739e-6, "1048576": 696e-6, "4194304": 1819e-6, "16777216": 9874e-6})
    assert stalled["alpha"] == 696e-6
    assert 1e9 < stalled["beta"] < 1e10


def test_the_layouts_own_host_work_is_measured_on_its_layout_at_8_tokens(tmp_path):
    """The small run keeps the run's layout (degrees, schedule, its micro-batch count) at one 8-token
    sequence per micro-batch; trained for real on two gloo ranks, its rank 0 logs a CPU time per step."""
    from moeforge.config import resolve_run_config
    from moeforge.plan.against import pipeline_microbatches, read_run
    from moeforge.plan.layout_overhead import REPS, WARMUP, small_layout_run, train_small

    run = resolve_run_config({}, dict(preset="debug", nproc=2, pp=2, pp_schedule="dualpipev", batch_size=16,
                                      seq_len=256, eval_every=50))
    assert pipeline_microbatches(run.train) == 4  # one per stage a rank holds (2), x pp
    small = small_layout_run(run, dp=1, micro_batches=4).train
    assert (small.seq_len, small.batch_size, small.pp_microbatches, small.steps) == (8, 4, 4, WARMUP + REPS)
    assert (small.pp, small.pp_schedule, small.eval_every) == (2, "dualpipev", 0)
    ep = resolve_run_config({}, dict(preset="debug", nproc=2, ep=2, batch_size=16, grad_accum=2)).train
    assert pipeline_microbatches(ep) == 1
    assert (small_layout_run(resolve_run_config({}, dict(preset="debug", ep=2)), dp=2, micro_batches=1).train
            .batch_size) == 2
    run_dir = train_small(run, processes=2, dp=1, micro_batches=4, folder=tmp_path)
    rec = read_run(run_dir, processes=2)
    assert len(rec.cpu_times) == WARMUP + REPS and rec.measured_cpu > 0
    assert rec.run.train.pp_schedule == "dualpipev" and rec.run.train.seq_len == 8
