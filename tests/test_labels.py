"""The loss follows transformers' conventions: `labels` unshifted (the model shifts, -100 ignored), or
`shift_labels` already shifted, each compared with transformers.DeepseekV3ForCausalLM on the same weights."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moeforge  # noqa: E402
from moeforge.config import preset  # noqa: E402
from moeforge.model import IGNORE_INDEX, Transformer  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=1,
             topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=1.0, max_position_embeddings=256,
             num_nextn_predict_layers=0, initializer_range=0.1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
CASES = {
    "plain-q": {},
    "q-lora-groups-two-dense": dict(q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=2),
    "all-moe-yarn-unnormalised": dict(first_k_dense_replace=0, norm_topk_prob=False, rope_parameters=YARN),
}


def models(overrides, path):
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**SMALL, **overrides})).eval()
    theirs.save_pretrained(path)
    return theirs, moeforge.from_pretrained(path)


def batch(T=33):
    ids = torch.randint(0, SMALL["vocab_size"], (3, T), generator=torch.Generator().manual_seed(1))
    masked = ids.clone()
    masked[0, :9] = IGNORE_INDEX  # a prompt left out of the loss, as in supervised fine-tuning
    masked[2, -5:] = IGNORE_INDEX  # right padding
    return ids, masked


@pytest.mark.parametrize("case", CASES)
def test_unshifted_labels_give_transformers_loss(case, tmp_path):
    theirs, ours = models(CASES[case], tmp_path)
    ids, masked = batch()
    with torch.no_grad():
        for labels in (ids, masked):
            ref = theirs(input_ids=ids, labels=labels).loss
            got = ours(ids, labels=labels)
            torch.testing.assert_close(got.loss, ref, atol=1e-5, rtol=0)
            assert got.logits.shape == (3, 33, SMALL["vocab_size"])


def test_shift_labels_give_transformers_loss(tmp_path):
    """Pre-shifted targets (what the trainer's T+1-token windows give): transformers' `shift_labels`."""
    theirs, ours = models(CASES["plain-q"], tmp_path)
    window, _ = batch(T=34)
    x, y = window[:, :-1], window[:, 1:].clone()
    y[1, :4] = IGNORE_INDEX
    with torch.no_grad():
        ref = theirs(input_ids=x, labels=x, shift_labels=y).loss
        torch.testing.assert_close(ours(x, shift_labels=y).loss, ref, atol=1e-5, rtol=0)


def test_mtp_embeds_input_tokens_where_labels_are_ignored():
    """Depth 1 at position i: embedding of token i+1 taken from input_ids, scored on labels[i+2]."""
    model = Transformer(preset("debug")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    hidden = []
    model.norm.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    with torch.no_grad():
        out = model(ids, labels=labels)
        h, T, mtp = hidden[0], ids.shape[1], model.mtp[0]
        cos, sin = model.rotary(torch.arange(T - 2))
        x = mtp.eh_proj(torch.cat((mtp.enorm(model.embed_tokens(ids[:, 1:T - 1])), mtp.hnorm(h[:, :T - 2])), -1))
        logits = model.lm_head(mtp.norm(mtp.block(x, cos, sin)))
        ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 2:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.mtp_loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.mtp_loss_weight * ref)


def test_label_arguments_are_checked():
    model = Transformer(preset("debug"))
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, shift_labels=ids)
    with pytest.raises(ValueError, match="labels has shape"):
        model(ids, labels=ids[:, 1:])
