"""save_pretrained writes README.md: architecture, parameter counts (checked against the model's own
tensors), the trainer's facts (steps, tokens, final validation loss) and how to load it."""

import re

import torch

from conftest import small_run
from moeforge import from_pretrained
from moeforge.config import PRESETS, ModelConfig
from moeforge.hf import save_pretrained
from moeforge.model import Transformer
from moeforge.train import Trainer


def counted(card: str, label: str) -> int:
    return int(re.search(rf"- {label}[^(]*\(([\d,]+)\)", card)[1].replace(",", ""))


def test_card_states_the_architecture_and_parameter_counts_of_the_saved_model(tmp_path):
    config = ModelConfig(**PRESETS["debug"])
    model = Transformer(config)
    save_pretrained(model, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: moeforge\n") and "# export" in card
    params = dict(model.named_parameters())
    assert counted(card, "total") == sum(p.numel() for p in params.values())
    # activated per token: the main model, less the embedding lookup and the unselected routed experts
    main = {n: p.numel() for n, p in params.items() if not n.startswith("mtp.")}
    routed = sum(v for n, v in main.items() if ".mlp.experts." in n)
    unselected = routed * (1 - config.num_experts_per_tok / config.n_routed_experts)
    assert counted(card, "activated per token") == round(sum(main.values()) - main["embed_tokens.weight"] - unselected)
    assert (f"| layers | {config.num_hidden_layers} ({config.first_k_dense_replace} dense, "
            f"{config.num_hidden_layers - config.first_k_dense_replace} MoE) + 1 multi-token-prediction |") in card
    assert f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}" in card
    assert "no training record" in card
    # the loading recipe on the card works
    snippet = re.search(r"```python\n(.*?)```", card, re.S)[1].replace("PATH/TO/THIS/FOLDER", str(tmp_path / "export"))
    scope = {"input_ids": torch.tensor([[1, 2, 3]])}
    exec(snippet, scope)
    assert torch.equal(scope["logits"], from_pretrained(tmp_path / "export")(scope["input_ids"]).logits)


def test_trained_checkpoint_card_has_steps_tokens_and_final_validation_loss(tmp_path):
    run = small_run(tmp_path, steps=2, eval_every=2, eval_batches=1)
    summary = Trainer(run).fit()
    card = (tmp_path / "run" / "checkpoints" / "step-000002" / "README.md").read_text()
    cfg = run.train
    assert "# run, step 2" in card
    assert f"- steps: 2; training tokens: {2 * cfg.batch_size * cfg.seq_len * cfg.grad_accum:,}" in card
    assert f"validation loss (nats/token, latest evaluation): {summary['final_val_loss']:.4f} " \
           f"(from {summary['initial_val_loss']:.4f} at initialisation)" in card
    assert f"- data: {cfg.data}; tokenizer: bytes" in card and "trained with `moeforge train`" in card
