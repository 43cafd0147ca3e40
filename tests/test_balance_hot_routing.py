"""`--routing hot:F`: one expert of every MoE layer gets F x the mean load, measured by a training run."""

import json

import pytest
import torch

from conftest import small_run
from moeforge.cli import main
from moeforge.config import resolve_run_config
from moeforge.errors import ConfigError
from moeforge.train import Trainer


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_hot_routing_sends_f_times_the_mean_to_expert_zero(tmp_path, factor):
    run = small_run(tmp_path, steps=2, eval_every=0, routing=f"hot:{factor:g}", log_expert_counts=True)
    Trainer(run).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    E, K = run.model.n_routed_experts, run.model.num_experts_per_tok
    for row in rows:
        for layer in row["expert_counts"]:  # main MoE layers and the MTP block
            counts = torch.tensor(layer, dtype=torch.float64)
            mean = counts.sum() / E
            assert counts.sum() > 0 and abs(counts[0] / mean - factor) < 0.05
            cold = counts[1:]
            assert cold.max() - cold.min() <= 1  # the rest spread evenly
    # each token still has K distinct experts: the hot one at most once per token
    assert all(sum(layer) % K == 0 for row in rows for layer in row["expert_counts"])


@pytest.mark.parametrize("routing, message", [
    ("hot:1", "needs 1 < F"), ("hot:4.5", "needs 1 < F <= n_routed_experts / num_experts_per_tok = 8/2 = 4"),
    ("hot:x", "routing must be learned, balanced or hot:F"), ("warm", "routing must be learned, balanced or hot:F")])
def test_bad_hot_factor_is_one_line_error(routing, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run_config({}, {"preset": "debug", "routing": routing})


def test_bad_hot_factor_from_the_cli_exits_2(capsys):
    assert main(["train", "--preset", "debug", "--routing", "hot:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hot:9 needs 1 < F" in err[0]
