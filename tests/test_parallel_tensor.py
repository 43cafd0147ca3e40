"""Tensor parallelism pieces: the TP degree is checked, and the per-mesh clipping (parallel/grads.py, the one
clipping function of every layout) and the optimizer groups behave like torch's. That TP runs (TP 2, TP 2 x EP 2 x ZeRO-3) split the model and train exactly like one
process is checked through the trainer in test_parallel_distributed."""

import pytest
import torch

from moeforge.config import TrainConfig, preset
from moeforge.errors import ConfigError
from moeforge.model import Transformer
from moeforge.parallel import clip_grad_norm
from moeforge.parallel.tensor import check_tensor_parallel, split_param_groups
from moeforge.train import make_optimizer

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
    assert torch.allclose(clip_grad_norm([a, b], 0.5), expected)
    assert torch.allclose(torch.cat([a.grad.flatten(), b.grad]).norm(), torch.tensor(0.5), atol=1e-6)


def test_split_param_groups_keeps_options_and_every_parameter():
    model = Transformer(preset("debug"))
    opt = make_optimizer(model, TrainConfig())
    groups = split_param_groups(opt.param_groups)
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in opt.param_groups]  # all plain
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
