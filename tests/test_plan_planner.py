"""The planner returns only layouts that fit, fastest first, and rejects impossible layouts in one line."""

import pytest

from moeforge.errors import ConfigError
from moeforge.plan.catalog import get_hardware
from moeforge.plan.layout import Layout, TrainSettings, check_layout
from moeforge.plan.models import load_model
from moeforge.plan.planner import explain, plan

LITE = load_model("deepseek-v2-lite")
H100 = get_hardware("h100")
SETTINGS = TrainSettings(seq_len=4096, global_batch=256)


def test_ranked_layouts_fit_and_are_sorted():
    a100 = get_hardware("a100")
    p = plan(LITE, a100, 16, SETTINGS, top=1000)
    limit = a100.hbm_bytes * SETTINGS.memory_headroom
    assert p.ranked and all(c.fits and c.step.memory.total <= limit for c in p.ranked)
    assert p.rejected_memory > 0  # some layouts did not fit and were dropped
    times = [c.step.total for c in p.ranked]
    assert times == sorted(times)
    text = " ".join(explain(p))
    assert "Best layout" in text and "Memory on the fullest rank" in text and "did not fit" in text


def test_single_layout_is_evaluated_and_flagged():
    lo = Layout(dp=8, tp=1, pp=1, ep=8, zero=1)
    p = plan(LITE, H100, 8, SETTINGS, layout=lo)
    assert p.best.layout == lo and p.considered == 1


@pytest.mark.parametrize("layout, message", [
    (Layout(dp=2, tp=3, pp=1), "valid tp: 1, 2, 4, 8, 16"),
    (Layout(dp=6, tp=1, pp=1, ep=3), "valid ep: 1, 2, 4, 8"),
    (Layout(dp=16, tp=1, pp=1), "16 ranks, but there are 8 GPUs"),
    (Layout(dp=1, tp=1, pp=8, schedule="zb"), "choose one of: 1f1b, interleaved-1f1b, dualpipe"),
])
def test_impossible_layouts_are_one_line_errors(layout, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_layout(LITE, layout, 8 if layout.gpus != 6 else 6, SETTINGS, 8)
    assert "\n" not in str(e.value)


def test_nothing_fits_says_so():
    with pytest.raises(ConfigError, match="fits in"):
        plan(load_model("deepseek-v3"), H100, 8, TrainSettings(global_batch=8))
