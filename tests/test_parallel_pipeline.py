"""Pipeline-parallel pieces: stages chained in one process equal the model, gradients are averaged over dp
replicas (2 real gloo processes), layer splits and stage placement, and bad settings. That PP runs (1F1B,
interleaved 1F1B, DualPipeV at pp 2; pp 2 x dp 2) train exactly like one process, MTP and balance losses
included, is checked through the trainer in test_parallel_distributed."""

import os

import pytest
import torch
import torch.distributed as dist

from moeforge.config import preset
from moeforge.errors import ConfigError
from moeforge.model import Transformer
from moeforge.parallel.pipeline import Pipeline, StageModule, attach_aux_loss, build_pipeline, layer_ranges, stage_ids
from parallel_helpers import start_ranks

B, T, MICROBATCHES = 4, 8, 4


def debug_model():
    torch.manual_seed(0)
    return Transformer(preset("debug"))


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def dp_worker(rank, world, init_file, out_dir):
    """One whole-model stage replicated over 2 dp ranks, with made-up gradients: rank r's gradient is r + 1
    (a transposed one for the head), the norm weight has one on rank 0 only, the final norm none anywhere."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = debug_model()
    module = StageModule(model, 0, model.config.num_hidden_layers, True, True)
    pipe = Pipeline([module], schedule=None, group=None, shares_embedding=False, ends_on_one_rank=False,
                    n_microbatches=1, batch_shape=(1, 1), dp_group=dist.group.WORLD)
    for name, p in module.named_parameters():
        p.grad = torch.full_like(p, rank + 1.0)
    module.lm_head.weight.grad = torch.full(module.lm_head.weight.shape[::-1], rank + 1.0).t()  # other strides
    module.layers["0"].input_layernorm.weight.grad = None if rank else torch.full_like(
        module.layers["0"].input_layernorm.weight, 4.0)
    module.norm.weight.grad = None
    pipe._average_grads_over_dp()
    torch.save({n: (None if p.grad is None else (p.grad.clone(), p.grad.stride()))
                for n, p in module.named_parameters()}, os.path.join(out_dir, f"dp{rank}.pt"))
    dist.destroy_process_group()


def test_stage_gradients_are_averaged_over_data_parallel_replicas(tmp_path):
    start_ranks(dp_worker, (2, str(tmp_path / "init"), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"dp{r}.pt") for r in range(2)]
    for name, got in ranks[0].items():
        assert ranks[1][name] is None if got is None else torch.equal(ranks[1][name][0], got[0]), name
        if name == "norm.weight":
            assert got is None  # missing on every replica: stays missing (AdamW skips it, as in one process)
        elif name == "layers.0.input_layernorm.weight":
            assert torch.all(got[0] == 2.0)  # (4 + zeros) / 2
        else:
            assert torch.all(got[0] == 1.5), name  # (1 + 2) / 2
    assert ranks[0]["lm_head.weight"][1] == (1, ranks[0]["lm_head.weight"][0].shape[0])  # kept in place


def test_stage_modules_chained_in_one_process_equal_the_model():
    """Cut into 3 stages and run back to back, the stages compute the model's loss and gradients (the
    last stage's embedding copy, read by MTP, holds the rest of the embedding gradient)."""
    model = debug_model()
    x, y = batch(0)
    out = model(x, shift_labels=y)
    out.loss.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    stages = [StageModule(model, r.start, r.stop, s == 0, s == 2) for s, r in enumerate(layer_ranges(3, 3))]
    h = x
    for stage in stages:
        h = stage(h)
    loss = stages[-1].loss(h, x, y)
    loss.backward()
    torch.testing.assert_close(loss, out.loss)
    copy = stages[-1].embed_tokens.weight
    assert copy is not model.embed_tokens.weight and torch.equal(copy, model.embed_tokens.weight)
    model.embed_tokens.weight.grad += copy.grad
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], msg=k)


def test_attach_aux_loss_adds_its_gradient_without_changing_the_value():
    h = torch.randn(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    out = attach_aux_loss(h, w.square())
    assert torch.equal(out, h)
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones(3))
    assert w.grad == 4.0  # d(w^2)/dw with d(loss)/d(aux) = 1


def test_layer_split_and_stage_placement():
    assert [list(r) for r in layer_ranges(3, 2)] == [[0, 1], [2]]
    assert [len(r) for r in layer_ranges(3, 4)] == [1, 1, 1, 0]
    assert [list(r) for r in layer_ranges(3, 2, [0, 3])] == [[], [0, 1, 2]]
    with pytest.raises(ConfigError, match="summing to num_hidden_layers=3"):
        layer_ranges(3, 2, [1, 1])
    assert stage_ids(0, 2, 2, "loop") == [0, 2] and stage_ids(1, 2, 2, "loop") == [1, 3]
    assert stage_ids(0, 2, 2, "v") == [0, 3] and stage_ids(1, 2, 2, "v") == [1, 2]


def test_bad_pipeline_settings_name_the_problem():
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'zb'"):
        build_pipeline(debug_model(), None, (B, T), MICROBATCHES, "zb")
