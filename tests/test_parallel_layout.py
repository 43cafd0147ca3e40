"""Layout validation (no processes needed) and the expert-order permutation used by the EP dispatch."""

import pytest
import torch

from moeforge.cli import main
from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.parallel import ParallelLayout
from moeforge.parallel.expert import source_to_expert_order
from moeforge.parallel.launch import collective_errors, strip_launch_flags


def test_dp_defaults_to_world_over_tp_pp():
    layout = ParallelLayout.resolve(8, ep=2, tp=2)
    assert (layout.dp, layout.ep, layout.edp, layout.tp, layout.pp) == (4, 2, 2, 2, 1)
    assert layout.world_size == 8 and not layout.reshard_after_forward
    assert ParallelLayout.resolve(2, zero=3).reshard_after_forward


@pytest.mark.parametrize("world, kw, message", [
    (4, dict(dp=2), "dp x tp x pp = 2 x 1 x 1 = 2 must equal the number of processes (4)"),
    (6, dict(tp=4), "tp x pp = 4 x 1 = 4 does not divide the 6 processes"),
    (4, dict(ep=3), "ep=3 must divide dp=4"),
    (2, dict(zero=4), "--zero must be 2 or 3"),
    (2, dict(ep=0), "--ep must be >= 1"),
    (2, dict(dp=-1, tp=1), "--dp must be >= 1"),
])
def test_layout_errors_name_the_problem(world, kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelLayout.resolve(world, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(dp=16, ep=16), "ep=16 must divide n_routed_experts=8"),
    (dict(dp=1, tp=8), "tp=8 must divide num_attention_heads=4"),
    (dict(dp=1, pp=4), "pp=4 exceeds num_hidden_layers=3"),
])
def test_layout_must_fit_the_model(kw, message):
    with pytest.raises(ConfigError, match=message):
        ParallelLayout(**kw).check_model(preset("debug"))


def test_ep_needs_moe_layers_and_batch_must_split():
    dense = preset("debug")
    dense.first_k_dense_replace = dense.num_hidden_layers
    with pytest.raises(ConfigError, match="no MoE layers"):
        ParallelLayout(dp=2, ep=2).check_model(dense)
    with pytest.raises(ConfigError, match="batch_size=3 must be a multiple of dp=2"):
        ParallelLayout(dp=2).check_batch(3)


def test_trainer_runs_pp_with_dp_ep_and_tp_but_not_zero3_of_stages():
    assert ParallelLayout.resolve(4, pp=2).check_trainer().dp == 2  # pp x dp: stages replicated over dp
    ParallelLayout.resolve(2, pp=2, zero=3).check_trainer()  # pp alone: --zero has nothing to shard
    assert ParallelLayout.resolve(4, pp=2, ep=2).check_trainer().edp == 1  # pp x ep (x dp)
    assert ParallelLayout.resolve(4, pp=2, tp=2).check_trainer().dp == 1  # pp x tp
    for kw in (dict(pp=2, zero=3), dict(pp=2, ep=2, zero=3)):
        with pytest.raises(ConfigError, match=r"^--zero 3 with pp=2 x dp=2: pipeline stages are not sharded"):
            ParallelLayout.resolve(4, **kw).check_trainer()


def test_source_to_expert_order_against_a_python_reference():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (3, 4), generator=g)  # [sources, local experts], some empty blocks
    rows, pos = {}, 0
    for s in range(3):
        for e in range(4):
            rows[(s, e)] = list(range(pos, pos + int(counts[s, e])))
            pos += int(counts[s, e])
    expected = [r for e in range(4) for s in range(3) for r in rows[(s, e)]]
    assert source_to_expert_order(counts).tolist() == expected


def test_launch_helpers():
    assert strip_launch_flags(["train", "--nproc", "2", "--ep", "2", "--nproc=3"]) == ["train", "--ep", "2"]
    with pytest.raises(KeyError):  # not a collective failure (and no process group): unchanged
        with collective_errors("step 1", 5):
            raise KeyError("x")


def test_parallel_flags_without_processes_are_a_one_line_error(capsys):
    assert main(["train", "--preset", "debug", "--ep", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeforge train: error: --dp 0 --ep 2 --tp 1 --pp 1 needs several processes")
    assert main(["train", "--preset", "debug", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_a_failed_torchrun_job_names_the_rank_that_died():
    """torchrun stops the other ranks as soon as one dies, often before they report: the launcher's one line
    names the first failed rank and how it ended."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from moeforge.parallel.launch import describe_child_failure

    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="<N/A>")
    assert describe_child_failure(ChildFailedError("moeforge", {1: killed})) == \
        "rank 1 (pid 4242) was killed by SIGKILL: the distributed run failed"
    raised = ProcessFailure(local_rank=0, pid=4241, exitcode=1, error_file="<N/A>")
    raised.timestamp = killed.timestamp - 1  # failed first
    assert describe_child_failure(ChildFailedError("moeforge", {0: raised, 1: killed})) == \
        "rank 0 (pid 4241) exited with code 1; rank 1 failed too: the distributed run failed (see the rank errors above)"


def test_describe_says_what_zero_does_in_the_layout():
    """The startup line names the sharding that actually happens: none for replicated pipeline stages or a
    single data-parallel rank, whatever --zero says."""
    assert ParallelLayout.resolve(4, 2, 1, 1, 2, 2, 1).describe().endswith(
        "no ZeRO sharding (pipeline stages replicated over dp, gradients all-reduced)")
    assert "nothing to shard" in ParallelLayout.resolve(2, 1, 1, 2, 1, 3, 1).describe()
    assert ParallelLayout.resolve(4, 4, 2, 1, 1, 3, 1).describe().endswith("zero 3")
