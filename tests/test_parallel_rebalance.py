"""`moeforge train --ep 2 --redundant-experts R --rebalance-every K` (moeforge.parallel.rebalance), through
`DistributedTrainer` in a real 2-process gloo group.

* Under `--routing hot:2` (expert 0 of every MoE layer gets 2x the mean load on each rank), one run at R=2
  re-placed every step, resumed at R=2 re-placed every 2 steps, at R=4, then at R=0 (plain EP), logs what
  the same run without redundancy logs, step for step within 1e-5 (fp32: loss parts, gradient norm,
  validation loss, expert counts), and its DCP checkpoints' Hugging Face export holds the same tensors. The
  first re-placement really moved experts (slots changed, bytes moved, the hot expert got replicas) and
  raised the predicted balancedness, and the next step's rows per EP rank are more even; a resume at the
  same R keeps the placement.
* With learned routing, a single-process run resumed at 2 ranks with R=2 re-placed every step equals the
  single-process Trainer.
* Impossible combinations fail in one line.
"""

import pytest

from moeforge.cli import main
from moeforge.config import resolve_run_config
from moeforge.errors import ConfigError
from parallel_helpers import TRAIN, check_same_run, fit_in_gloo_group, fit_single, read_metrics

HOT = dict(ep=2, zero=2, routing="hot:2")


def test_redundant_experts_rebalanced_mid_run_equal_the_run_without_them(tmp_path):
    want, got, learned = tmp_path / "static", tmp_path / "redundant", tmp_path / "learned"
    fit_single(learned, steps=1)  # a single-process checkpoint, resumed below with redundant experts
    jobs = [dict(run_dir=want, steps=6, save_every=1, **HOT),
            dict(run_dir=got, steps=2, redundant_experts=2, rebalance_every=1, **HOT),
            dict(run_dir=got, steps=4, redundant_experts=2, rebalance_every=2, resume=True, **HOT),
            dict(run_dir=got, steps=5, redundant_experts=4, rebalance_every=1, resume=True, **HOT),
            dict(run_dir=got, steps=6, redundant_experts=0, rebalance_every=0, resume=True, **HOT),
            dict(run_dir=learned, steps=3, ep=2, redundant_experts=2, rebalance_every=1, resume=True)]
    fit_in_gloo_group(tmp_path, 2, jobs)
    check_same_run(got, want, "R=2 (K=1) -> R=2 (K=2) -> R=4 (K=1) -> R=0 under hot:2")

    rows = read_metrics(got)
    assert all(len(m["ep_rank_rows"]) == 2 and sum(m["ep_rank_rows"]) > 0 for m in rows[:5])
    assert "ep_rank_rows" not in rows[5]  # the last step ran without redundancy
    assert [m["step"] for m in rows if "rebalance" in m] == [1, 2, 4, 5]
    first = rows[0]["rebalance"]
    assert first["slots_changed"] > 0 and first["bytes_moved"] > 0
    assert all(layer[0] > 1 for layer in first["replicas"])  # hot expert 0 (one copy at first) replicated
    assert min(first["balancedness_after"]) > min(first["balancedness_before"])
    # The straggler signal: after the re-placement the EP ranks' rows are closer to even than before.
    assert rows[1]["ep_rows_max_over_mean"] < rows[0]["ep_rows_max_over_mean"]
    assert rows[1]["rebalance"]["slots_changed"] == 0  # same loads, same placement: nothing to move
    assert rows[3]["rebalance"]["slots_changed"] == 0  # the resume at R=2 took the checkpoint's placement over
    assert rows[4]["rebalance"]["slots_changed"] > 0  # R=4 starts from the first guess again

    ref = fit_single(tmp_path / "single", steps=3)
    check_same_run(learned, ref, "1 process -> R=2 (K=1), learned routing, vs one process")
    assert read_metrics(learned)[1]["rebalance"]["slots_changed"] > 0


@pytest.mark.parametrize("flags, message", [
    (dict(redundant_experts=2, rebalance_every=1), r"^--redundant-experts 2 needs expert parallelism \(--ep > 1\)"),
    (dict(ep=2, redundant_experts=3, rebalance_every=1), r"^--redundant-experts 3 must divide evenly over the ep=2 "),
    (dict(ep=2, redundant_experts=2), r"^--rebalance-every must be >= 1 with --redundant-experts"),
    (dict(ep=2, rebalance_every=4), r"^--rebalance-every 4 needs --redundant-experts R > 0"),
    (dict(ep=2, redundant_experts=-2), r"^--redundant-experts must be >= 0, got -2$"),
    (dict(ep=2, pp=2, redundant_experts=2, rebalance_every=1), r"^--redundant-experts with --pp 2: "),
    (dict(ep=2, redundant_experts=2, rebalance_every=1, ep_dispatch="fp8"), r"^--redundant-experts with --ep-dispatch fp8"),
])
def test_impossible_combinations_fail_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve_run_config({}, {**TRAIN, **flags})
    assert "\n" not in str(err.value)


def test_cli_refuses_redundant_experts_without_ep(capsys):
    assert main(["train", "--preset", "debug", "--redundant-experts", "2", "--rebalance-every", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--redundant-experts 2 needs expert parallelism" in err and len(err.splitlines()) == 1
