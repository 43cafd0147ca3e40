"""Expert counts and bias updates across 2 real gloo processes equal the single-process result."""

import os

import torch
import torch.distributed as dist

from moeforge.balance import BiasBalancer, gather_counts, moe_modules
from moeforge.config import preset
from moeforge.model import Transformer
from parallel_helpers import start_ranks


def batch(rank):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    with torch.no_grad():
        model(batch(rank))  # each rank routes its own tokens
    counts = gather_counts(model, group=dist.group.WORLD)
    BiasBalancer(gamma=0.01).update(model, step=0, group=dist.group.WORLD)
    biases = torch.stack([m.gate.e_score_correction_bias for m in moe_modules(model)])
    torch.save({"counts": counts, "biases": biases}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_counts_and_bias_updates_all_reduce_over_two_ranks(tmp_path):
    world = 2
    start_ranks(worker, (world, str(tmp_path / "init"), str(tmp_path)), world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    torch.manual_seed(0)
    single = Transformer(preset("debug"))
    with torch.no_grad():
        single(torch.cat([batch(r) for r in range(world)]))
    expected_counts = gather_counts(single)
    BiasBalancer(gamma=0.01).update(single, step=0)
    expected_biases = torch.stack([m.gate.e_score_correction_bias for m in moe_modules(single)])
    for r in results:
        assert torch.equal(r["counts"], expected_counts)
        assert torch.equal(r["biases"], expected_biases)
    assert expected_counts.sum() == world * 2 * 16 * single.config.num_experts_per_tok * len(expected_counts)
