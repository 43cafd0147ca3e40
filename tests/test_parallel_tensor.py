"""Tensor parallelism (TP=2, 2 real gloo processes) trains exactly like one process on the same batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from moeforge.balance import BiasBalancer
from moeforge.balance.losses import RouterProbe
from moeforge.config import TrainConfig, preset
from moeforge.errors import ConfigError
from moeforge.model import Transformer
from moeforge.parallel.tensor import (apply_tensor_parallel, check_tensor_parallel, clip_grad_norm_,
                                      full_state_dict, split_param_groups)
from moeforge.train import make_optimizer
from parallel_helpers import reference_steps, spread_router_model

STEPS, B, T = 3, 2, 8


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def optimizer(model):
    """The trainer's AdamW (decay groups, fused), split so DTensor and plain parameters never mix.

    eps=1e-6 instead of 1e-8: Adam's first steps move every weight by about lr whatever the gradient's size,
    so gradient entries near 0 turn fp32 summation-order noise (~1e-10, different when heads or
    micro-batches are summed in another order) into O(lr) weight differences; a larger eps bounds that by
    lr * noise / eps without changing anything else being checked.
    """
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    groups = split_param_groups(opt.param_groups)
    for g in groups:
        g["eps"] = 1e-6
    return type(opt)(groups)


def train(model, clip=clip_grad_norm_):
    """3 steps of the trainer's loop: loss + sequence balance loss, clip, AdamW, balancing bias update."""
    return reference_steps(model, optimizer(model), batch, STEPS, T, clip=clip)


def state(model):
    params = full_state_dict(model)
    params.update({k: b.clone() for k, b in model.named_buffers() if k.endswith("e_score_correction_bias")})
    return params


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = apply_tensor_parallel(spread_router_model(), mesh)
    attn = model.layers[0].self_attn
    local = {"heads": attn.n_heads, "q_b_rows": attn.q_b_proj.weight.to_local().shape[0],
             "vocab_rows": model.embed_tokens.weight.to_local().shape[0]}
    losses = train(model)
    params = state(model)  # full_tensor() is a collective: every rank calls it
    torch.save({"losses": losses, "params": params, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_tp2_matches_single_process(tmp_path):
    torch.manual_seed(0)
    single = spread_router_model()
    expected_losses = train(single, clip=torch.nn.utils.clip_grad_norm_)
    expected = state(single)

    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    cfg = preset("debug")
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["local"] == {"heads": cfg.num_attention_heads // 2,
                              "q_b_rows": cfg.num_attention_heads // 2 * cfg.qk_head_dim,
                              "vocab_rows": cfg.vocab_size // 2}
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(expected_losses), rtol=0, atol=1e-5)
        assert r["params"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(r["params"][name], value, rtol=0, atol=1e-5, msg=name)


def test_tp_degree_must_divide_heads():
    check_tensor_parallel(preset("debug"), 2)
    with pytest.raises(ConfigError, match="num_attention_heads=4"):
        check_tensor_parallel(preset("debug"), 3)
    with pytest.raises(ConfigError, match=">= 1"):
        check_tensor_parallel(preset("debug"), 0)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    (a.square().sum() + b.pow(3).sum()).backward()
    grads = [a.grad.clone(), b.grad.clone()]
    expected = torch.nn.utils.clip_grad_norm_([a, b], 0.5)
    a.grad, b.grad = grads
    assert torch.allclose(clip_grad_norm_([a, b], 0.5), expected)
    assert torch.allclose(torch.cat([a.grad.flatten(), b.grad]).norm(), torch.tensor(0.5), atol=1e-6)


def test_split_param_groups_keeps_options_and_every_parameter():
    model = Transformer(preset("debug"))
    opt = make_optimizer(model, TrainConfig())
    groups = split_param_groups(opt.param_groups)
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in opt.param_groups]  # all plain
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def worker_2d(rank, world, init_file, out_dir):
    """FSDP (dp=2) x TP (tp=2): TP first on the tp sub-mesh, then fully_shard on the dp sub-mesh."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"]
    torch.manual_seed(0)
    model = apply_tensor_parallel(spread_router_model(), mesh["tp"])
    for block in list(model.layers) + [m.block for m in model.mtp]:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    probe = RouterProbe(model, seq_alpha=1e-2, seq_len=T)
    opt = optimizer(model)
    half, dp_rank = B // 2, dp.get_local_rank()
    losses = []
    for step in range(STEPS):
        x, y = (t[dp_rank * half:(dp_rank + 1) * half] for t in batch(step))  # each dp rank: half the batch
        loss = model(x, shift_labels=y).loss + probe.pop_loss()
        loss.backward()  # FSDP averages gradients over dp: the mean over the global batch
        clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        BiasBalancer(0.01).update(model, step, group=dp.get_group())
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=dp.get_group())
        losses.append(global_loss.item() / 2)
    params = state(model)
    if rank == 0:
        torch.save({"losses": losses, "params": params}, os.path.join(out_dir, "rank0.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not os.environ.get("MOEFORGE_SLOW_TESTS"),
                    reason="4 processes (~60 s on a loaded 2-core machine); set MOEFORGE_SLOW_TESTS=1")
def test_fsdp2_x_tp2_matches_single_process(tmp_path):
    torch.manual_seed(0)
    single = spread_router_model()
    expected_losses = train(single, clip=torch.nn.utils.clip_grad_norm_)
    expected = state(single)
    mp.spawn(worker_2d, args=(4, str(tmp_path / "init"), str(tmp_path)), nprocs=4, join=True)
    r = torch.load(tmp_path / "rank0.pt")
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(expected_losses), rtol=0, atol=1e-5)
    assert r["params"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(r["params"][name], value, rtol=0, atol=1e-5, msg=name)
