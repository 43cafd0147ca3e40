"""README.md beside saved weights: what the model is, how big, how it was trained and how to load it.

`save_pretrained` writes it for every export; the trainer adds the facts only it knows (steps, tokens,
validation loss, data, recipe) through `training_facts`. Hugging Face reads the YAML header as metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelConfig


def training_facts(trainer) -> dict:
    """What a Trainer (or DistributedTrainer) knows about the run so far, for the card."""
    cfg = trainer.cfg
    layout = getattr(trainer, "layout", None)
    return {
        "steps": trainer.step,
        "tokens": trainer.step * cfg.batch_size * cfg.seq_len * cfg.grad_accum,
        "validation_loss": getattr(trainer, "last_val_loss", None),
        "initial_validation_loss": trainer.initial_val_loss,
        "data": trainer.corpus_source,
        "tokenizer": cfg.tokenizer or "bytes (UTF-8 bytes as tokens)",
        "preset": cfg.preset,
        "recipe": (f"AdamW (lr {cfg.lr:g}, betas {cfg.beta1:g}/{cfg.beta2:g}, weight decay {cfg.weight_decay:g}), "
                   f"{cfg.warmup_steps} warmup steps then {cfg.schedule} decay to {cfg.min_lr_ratio:g} x lr, "
                   f"batch {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} tokens, grad clip {cfg.grad_clip:g}"),
        "precision": cfg.precision,
        "balancing": (f"aux-loss-free bias update speed {cfg.bias_update_speed:g}, sequence-wise aux loss "
                      f"{cfg.seq_aux_alpha:g}" + (f", batch aux loss {cfg.batch_aux_alpha:g}"
                                                   if cfg.batch_aux_alpha else "")),
        "parallelism": (f"dp {layout.dp}, ep {layout.ep}, tp {layout.tp}, pp {layout.pp}" if layout is not None
                        else "single process"),
    }


def render_model_card(config: ModelConfig, title: str, training: dict | None = None) -> str:
    from .costs import human_count, parameter_counts

    c, p = config, parameter_counts(config)
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    lines = ["---", "library_name: moeforge", "tags:", "- moeforge", "- deepseek_v3", "- mixture-of-experts", "---",
             f"# {title}", "",
             "A DeepSeek-V3-style Mixture-of-Experts causal language model saved by moeforge in the Hugging Face "
             "`DeepseekV3ForCausalLM` layout.", "",
             "## Architecture", "",
             "| | |", "|---|---|",
             f"| layers | {c.num_hidden_layers} ({c.first_k_dense_replace} dense, {moe_layers} MoE)"
             + (f" + {c.num_nextn_predict_layers} multi-token-prediction" if c.num_nextn_predict_layers else "") + " |",
             f"| hidden size | {c.hidden_size} |",
             f"| attention | MLA, {c.num_attention_heads} heads, q_lora_rank {c.q_lora_rank}, kv_lora_rank "
             f"{c.kv_lora_rank}, head dims nope {c.qk_nope_head_dim} / rope {c.qk_rope_head_dim} / v {c.v_head_dim} |",
             f"| experts per MoE layer | {c.n_routed_experts} routed (top-{c.num_experts_per_tok}"
             + (f" within the best {c.topk_group} of {c.n_group} groups" if c.n_group > 1 else "")
             + f") + {c.n_shared_experts} shared, expert FFN {c.moe_intermediate_size} |",
             f"| vocabulary / context | {c.vocab_size} tokens / {c.max_position_embeddings} positions |", "",
             "## Parameters", "",
             f"- total: {human_count(p['total'] + p['mtp'])} ({p['total'] + p['mtp']:,})"
             + (f", of which multi-token prediction {human_count(p['mtp'])}" if p["mtp"] else ""),
             f"- activated per token: {human_count(p['activated'])} ({p['activated']:,}): the main model's "
             "weights one token uses (its routed experts only, no embedding lookup)", ""]
    lines += ["## Training", ""]
    if training:
        loss = training.get("validation_loss")
        start = training.get("initial_validation_loss")
        lines += [f"- steps: {training['steps']:,}; training tokens: {training['tokens']:,}",
                  "- validation loss (nats/token, latest evaluation): "
                  + (f"{loss:.4f}" if loss is not None else "not measured")
                  + (f" (from {start:.4f} at initialisation)" if start is not None else ""),
                  f"- data: {training['data']}; tokenizer: {training['tokenizer']}",
                  f"- preset {training['preset']}, precision {training['precision']}, {training['parallelism']}",
                  f"- optimizer: {training['recipe']}",
                  f"- load balancing: {training['balancing']}",
                  "- trained with `moeforge train` (the run folder's config.toml holds every setting)", ""]
    else:
        lines += ["Not written by `moeforge train`: no training record.", ""]
    lines += ["## How to load", "", "```python", "import moeforge", "",
              "model = moeforge.from_pretrained(\"PATH/TO/THIS/FOLDER\")  # a moeforge Transformer",
              "logits = model(input_ids).logits", "```", "",
              "Or `moeforge generate --checkpoint PATH --prompt \"...\"`, `moeforge serve --checkpoint PATH`, and "
              "`moeforge eval --checkpoint PATH --tasks ...`; "
              "`transformers.AutoModelForCausalLM.from_pretrained(PATH)` reads the same files (DeepseekV3)."
              + (" The tokenizer is byte-level (token = UTF-8 byte, 0 = end of document)."
                 if training and str(training.get("tokenizer", "")).startswith("bytes") else ""), ""]
    return "\n".join(lines)


def write_model_card(folder: Path, config: ModelConfig, training: dict | None = None) -> Path:
    """Write folder/README.md; a training checkpoint (runs/NAME/checkpoints/[.tmp-]step-N) is titled
    'NAME, step N'."""
    folder = Path(folder)
    title = folder.name
    step = re.fullmatch(r"(?:\.tmp-)?step-(\d+)(?:-\d+)?", folder.name)
    if step and folder.parent.name == "checkpoints":
        title = f"{folder.parent.parent.name}, step {int(step[1])}"
    path = folder / "README.md"
    path.write_text(render_model_card(config, title, training))
    return path
