"""Step time, memory and decode models: the paper's TPOT estimate, bubble formulas, memory accounting."""

import dataclasses

import pytest

from moeforge.errors import ConfigError
from moeforge.plan.catalog import get_hardware
from moeforge.plan.decode import decode_estimate, ep_bound_tpot
from moeforge.plan.layout import Layout, TrainSettings
from moeforge.plan.memory import memory_per_rank
from moeforge.plan.models import load_model
from moeforge.plan.network import topology_for
from moeforge.plan.steptime import bubble_time, step_time

V3 = load_model("deepseek-v3")
H800 = get_hardware("h800")
# DeepSeek-V3's published layout (V3 report, Sec. 3.2): PP16 (DualPipe), EP64 over 8 nodes, ZeRO-1 DP.
V3_LAYOUT = Layout(dp=128, tp=1, pp=16, ep=64, zero=1, schedule="dualpipe", recompute="selective")
V3_SETTINGS = TrainSettings(seq_len=4096, global_batch=15360)


def test_tpot_reproduces_the_insights_estimate():
    """Insights into DeepSeek-V3, Sec. 2.3.2: hidden rounded to 7K, 61 layers, 32 tokens, 9 experts."""
    assert ep_bound_tpot(7000, 61, 50e9) == pytest.approx(14.76e-3, rel=1e-3)
    assert ep_bound_tpot(7000, 1, 50e9) / 2 == pytest.approx(120.96e-6)
    assert ep_bound_tpot(7000, 61, 900e9) == pytest.approx(0.82e-3, rel=1e-2)
    h800 = decode_estimate(V3, H800, 2048)  # exact hidden 7168: 2.4% above the rounded figure
    assert h800.link == "nic" and h800.ep_bound_s == pytest.approx(14.76e-3, rel=0.03)
    nvl = decode_estimate(V3, get_hardware("gb200-nvl72"), 72)
    assert nvl.link == "nvlink" and nvl.ep_bound_s == pytest.approx(0.82e-3, rel=0.03)
    assert h800.tpot_s == max(h800.ep_bound_s, h800.hbm_bound_s)


def test_bubbles_follow_the_dualpipe_readme():
    t = 3.0  # F = 1, B = 2, W = 1
    assert bubble_time(Layout(pp=8), t) == pytest.approx(7 * 3)  # (PP-1)(F+B)
    assert bubble_time(Layout(pp=8, schedule="dualpipe"), t) == pytest.approx((8 / 2 - 1) * (3 + 2 - 3))
    assert bubble_time(Layout(pp=1), t) == 0
    # DualPipeV: 4 ranks hold 8 pieces and run both of theirs per micro-batch, so a piece's F&B is t / 2
    assert bubble_time(Layout(pp=4, schedule="dualpipev"), t) == pytest.approx((8 / 2 - 1) * (1.5 + 1 - 1.5))


def test_dualpipev_holds_one_copy_of_the_model_and_dualpipe_two():
    """DualPipe: rank s holds stages s and PP-1-s of PP (the pipeline holds the model twice); DualPipeV:
    pieces s and 2PP-1-s of 2PP (once). Summed over the pipeline's ranks, in parameters."""
    from moeforge.plan.memory import stage_params

    whole = sum(stage_params(V3, Layout(pp=1), 0))
    for schedule, copies in (("dualpipe", 2), ("dualpipev", 1), ("1f1b", 1)):
        lo = Layout(dp=128, pp=16, ep=64, schedule=schedule)
        ranks_total = sum(stage_params(V3, lo, s)[0] + stage_params(V3, lo, s)[1] * lo.ep for s in range(16))
        assert ranks_total == pytest.approx(copies * whole, rel=0.02), schedule


def test_v3_published_run_validates_against_its_gpu_hours():
    """V3 report: 180K H800 GPU hours per trillion tokens. Nothing in the device model is fitted to it
    (component benchmarks only), so this is a held-out check; the bound is loose and the miss is in
    docs/planner.md (the model predicts ~143K: it has no load imbalance, no stragglers)."""
    st = step_time(V3, H800, topology_for(H800, 2048), V3_LAYOUT, V3_SETTINGS)
    gpu_hours = 1e12 / (st.tokens_per_s / 2048) / 3600
    assert gpu_hours == pytest.approx(180e3, rel=0.3)
    assert sum(st.parts().values()) == pytest.approx(st.total)
    tokens = 15360 * 4096
    assert st.mfu == pytest.approx(st.flops_per_token * tokens / st.total / (2048 * H800.peak_flops))
    # The published layout ran on 80 GB H800s; with the MTP module on the last stage (issue 17 item 3) the
    # model puts it 2.5% over (82.0 GB): a known overestimate, in docs/planner.md. Guard against worse.
    assert st.memory.total < 80e9 * 1.05


def test_v2_published_run_is_a_second_held_out_check():
    """DeepSeek-V2 report, Sec. 3.1.3-3.1.4: 172.8K H800 GPU hours per trillion tokens, BF16, 16-way
    zero-bubble PP, 8-way EP, ZeRO-1 DP, recomputation of some operators, the shared experts overlapped with
    the all-to-all; seq 4096, batch 9216. The GPU count is not published (1024 here; the per-token cost
    barely depends on it) and the planner has no zero-bubble schedule (1F1B's larger bubble stands in).
    Measured miss: -29% (docs/planner.md); the bound only guards against it getting worse."""
    v2 = load_model("deepseek-v2")
    lo = Layout(dp=64, pp=16, ep=8, zero=1, schedule="1f1b", recompute="selective")
    st = step_time(v2, H800, topology_for(H800, 1024), lo, TrainSettings(seq_len=4096, global_batch=9216,
                                                                          precision="bf16"))
    gpu_hours = 1e12 / (st.tokens_per_s / 1024) / 3600
    assert gpu_hours == pytest.approx(172.8e3, rel=0.35)


@pytest.mark.parametrize("gpus, layout, seq, published_tflops", [
    (8192, dict(dp=64, tp=8, pp=16), 8192, 430), (16384, dict(dp=128, tp=8, pp=16), 8192, 400),
    (16384, dict(dp=8, tp=8, pp=16, cp=16), 131072, 380)])
def test_llama3_405b_published_runs_are_held_out_checks(gpus, layout, seq, published_tflops):
    """Llama 3 paper, Table 4: TFLOPs per H100 at three scales, BF16, 16M tokens a batch. The paper's
    interleaved schedule is taken with v = 2 (its v is not given). Measured misses -4%, -12%, -13%
    (docs/planner.md); the bound guards against worse."""
    llama, h100 = load_model("llama3.1-405b"), get_hardware("h100")
    lo = Layout(schedule="interleaved-1f1b", recompute="none", **layout)
    st = step_time(llama, h100, topology_for(h100, gpus), lo,
                   TrainSettings(seq_len=seq, global_batch=2 ** 24 // seq, precision="bf16"))
    assert st.mfu * h100.bf16_tflops == pytest.approx(published_tflops, rel=0.2)


def test_hidden_all_to_all_costs_the_sms_its_kernels_hold():
    """DualPipe hides V3's all-to-all, but its kernels hold 20 of the 132 SMs while it runs: the overlapped
    compute pays 20/132 of the hidden traffic; nothing with the SMs unknown or the kernels off the SMs."""
    topo = topology_for(H800, 2048)
    base = step_time(V3, H800, topo, V3_LAYOUT, V3_SETTINGS)
    assert base.exposed_ep_pp == 0 and base.comm_sm == pytest.approx(base.ep_comm * 20 / 132)
    assert base.parts()["EP kernels' SMs (hidden all-to-all)"] == base.comm_sm
    assert sum(base.parts().values()) == pytest.approx(base.total)
    free = step_time(V3, H800, topo, V3_LAYOUT, dataclasses.replace(V3_SETTINGS, ep_comm_sms=0))
    assert free.comm_sm == 0 and free.total == pytest.approx(base.total - base.comm_sm)
    unknown = step_time(V3, dataclasses.replace(H800, sm_count=0), topo, V3_LAYOUT, V3_SETTINGS)
    assert unknown.comm_sm == 0
    exposed = step_time(V3, H800, topo, V3_LAYOUT, dataclasses.replace(V3_SETTINGS, overlap=0.0))
    assert exposed.comm_sm == 0  # nothing hidden, nothing overlapped
    with pytest.raises(ConfigError, match="ep_comm_sms"):
        TrainSettings(ep_comm_sms=-1).validate()


def test_overlap_schedule_and_precision_move_step_time_the_right_way():
    topo = topology_for(H800, 2048)
    base = step_time(V3, H800, topo, V3_LAYOUT, V3_SETTINGS)
    assert base.ep_comm > 0 and base.exposed_ep_pp == 0  # DualPipe hides EP behind the other micro-batch
    assert step_time(V3, H800, topo, V3_LAYOUT, dataclasses.replace(V3_SETTINGS, overlap=0.0)).total > base.total
    f1b = dataclasses.replace(V3_LAYOUT, schedule="1f1b")
    one = step_time(V3, H800, topo, f1b, V3_SETTINGS)
    assert one.exposed_ep_pp > 0.5 * one.ep_comm  # 1F1B: the all-to-all sits on the critical path
    bf16 = dataclasses.replace(V3_SETTINGS, precision="bf16")
    assert step_time(V3, H800, topo, V3_LAYOUT, bf16).compute > base.compute


def test_memory_closed_form_single_rank():
    m = load_model("qwen2.5-72b")
    s = TrainSettings(seq_len=16, global_batch=1)
    mem = memory_per_rank(m, Layout(), s)
    assert mem.weights == pytest.approx(2 * m.total_params)
    assert mem.gradients == pytest.approx(4 * m.total_params)
    assert mem.optimizer == pytest.approx((4 + 2 * 2) * m.total_params)


def test_memory_shrinks_with_zero_and_recompute():
    s = V3_SETTINGS
    by_zero = [memory_per_rank(V3, dataclasses.replace(V3_LAYOUT, zero=z), s) for z in (0, 1, 2, 3)]
    totals = [m.total for m in by_zero]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    acts = [memory_per_rank(V3, dataclasses.replace(V3_LAYOUT, recompute=r), s).activations
            for r in ("none", "selective", "full")]
    assert acts == sorted(acts, reverse=True)
    one = memory_per_rank(V3, dataclasses.replace(V3_LAYOUT, schedule="1f1b"), s)
    two = memory_per_rank(V3, V3_LAYOUT, s)
    assert two.weights > 1.5 * one.weights  # DualPipe keeps two stages per device


def test_search_tries_context_parallelism_for_long_sequences_only():
    """At 128K tokens a sequence is split over ranks (without CP the search's best for Llama 3 405B on 16K
    GPUs was a 93%-bubble pipeline); at 4K no CP layout is tried, so the default search is unchanged."""
    from moeforge.plan.planner import context_degrees, enumerate_layouts, plan

    assert context_degrees(64, 4096) == [1] and context_degrees(64, 131072) == [1, 2, 4, 8, 16, 32]
    qwen, h200 = load_model("qwen2.5-72b"), get_hardware("h200")
    long = plan(qwen, h200, 16, TrainSettings(seq_len=131072, global_batch=2, precision="bf16"), top=1)
    assert long.best.layout.cp > 1 and long.best.fits
    short = TrainSettings(seq_len=4096, global_batch=64, precision="bf16")
    assert all(lo.cp == 1 for lo in enumerate_layouts(qwen, 16, short, h200.gpus_per_node))
