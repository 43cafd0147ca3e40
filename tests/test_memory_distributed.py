"""Activation checkpointing under data parallelism, through `moeforge train --nproc 2`: the plan (and a
--memory-budget) is measured on the micro-batch each rank runs, against one process running that share."""

import json

import torch

from conftest import SMALL_CORPUS
from moeforge import hardware
from moeforge.cli import main
from moeforge.config import TrainConfig, preset
from moeforge.memory import build_plan
from moeforge.memory.setup import PLAN_FILE, sample_batch
from moeforge.model import Transformer
from parallel_helpers import one_thread


def test_activation_budget_is_per_rank_under_data_parallelism(tmp_path):
    """dp 2 with a global batch of 4: each rank runs 2 sequences, so its plan must be measured on 2 (main
    profiled all 4 on every rank: a budget twice what a rank holds). The FSDP2-gathered weights a sharded
    block saves for backward are parameters, not activations: the rank's figures equal one plain process's."""
    run = tmp_path / "dp"
    with one_thread():
        assert main(["train", "--preset", "debug", "--data", str(SMALL_CORPUS), "--seq-len", "32", "--batch-size", "4",
                     "--steps", "1", "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0",
                     "--device", "cpu", "--precision", "fp32", "--run-dir", str(run), "--nproc", "2",
                     "--activation-checkpointing", "auto", "--memory-budget", "0.5"]) == 0
    plan = json.loads((run / PLAN_FILE).read_text())
    seed = TrainConfig().seed
    torch.manual_seed(seed)  # the trainer's initialisation
    model = hardware.configure(Transformer(preset("debug")), hardware.probe("cpu"), seq_len=32)
    one_rank = build_plan(model, "auto", 0.5, sample_batch(256, 2, 32, "cpu", seed))
    assert plan["sample_shape"] == [2, 32]
    assert plan["baseline_bytes"] == one_rank.baseline_bytes
    assert plan["budget_bytes"] == one_rank.budget_bytes
