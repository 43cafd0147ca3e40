"""Acceptance: EP, FSDP (ZeRO-2/3) and EP x FSDP runs in real gloo process groups compute what one
process computes on the same global batch: the losses of the first 3 steps, the gradient norms, the
global expert counts and every updated parameter and routing bias, within 1e-5 (fp32)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.parallel import ParallelLayout, build_mesh, parallelize
from parallel_helpers import Loop, batches, build_model, full_state, init_gloo, single_process_run

TWO_RANK_LAYOUTS = [dict(ep=2, zero=2), dict(ep=1, zero=2), dict(ep=1, zero=3), dict(ep=2, zero=3)]
FOUR_RANK_LAYOUTS = [dict(ep=2, zero=3)]  # EP x FSDP: edp 2 x ep 2


def worker(rank, world, layouts, init_file, out_dir):
    init_gloo(rank, world, init_file)
    for i, kw in enumerate(layouts):
        layout = ParallelLayout.resolve(world, **kw)
        mesh = build_mesh(layout, "cpu")
        model = parallelize(build_model(), layout, mesh)
        loop = Loop(model, group=mesh["dp"].get_group(), rank=mesh["dp"].get_local_rank(), dp=layout.dp)
        records = [loop.train_step(x, y) for x, y in batches()]
        state = full_state(model)
        if rank == 0:
            torch.save({"records": records, "state": state}, os.path.join(out_dir, f"layout{i}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return single_process_run()


def check_matches(result, reference, what):
    ref_records, ref_state = reference
    for step, (got, want) in enumerate(zip(result["records"], ref_records)):
        assert abs(got["loss"] - want["loss"]) < 1e-5, f"{what}: loss at step {step + 1}"
        assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-5, f"{what}: grad norm at step {step + 1}"
        assert torch.equal(got["counts"], want["counts"]), f"{what}: expert counts at step {step + 1}"
    assert result["state"].keys() == ref_state.keys()
    for name, want in ref_state.items():
        got = result["state"][name]
        assert got.shape == want.shape, f"{what}: {name} shape"
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{what}: {name} after 3 steps")


def run_layouts(tmp_path, world, layouts):
    mp.spawn(worker, args=(world, layouts, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"layout{i}.pt") for i in range(len(layouts))]


def test_two_ranks_ep_and_fsdp_match_single_process(tmp_path, reference):
    results = run_layouts(tmp_path, 2, TWO_RANK_LAYOUTS)
    losses = [r["loss"] for r in reference[0]]
    assert losses[0] != losses[-1]  # the parameters did move
    for kw, result in zip(TWO_RANK_LAYOUTS, results):
        check_matches(result, reference, f"2 ranks {kw}")


def test_four_ranks_ep_x_fsdp_matches_single_process(tmp_path, reference):
    results = run_layouts(tmp_path, 4, FOUR_RANK_LAYOUTS)
    for kw, result in zip(FOUR_RANK_LAYOUTS, results):
        check_matches(result, reference, f"4 ranks {kw}")
