"""Typed configs: the model (Hugging Face DeepseekV3Config field names), presets, and training.

Each field is documented once, here; the CLI builds its flags from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError


def doc(text: str, **kw) -> Any:
    """A dataclass field default with its help text attached (read by the CLI and `describe`)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    """A DeepSeek-V3-style MoE transformer. Field names follow Hugging Face `DeepseekV3Config`."""

    vocab_size: int = doc("Vocabulary size.", default=256)
    hidden_size: int = doc("Model width D.", default=256)
    intermediate_size: int = doc("Hidden width of the dense SwiGLU MLP (first_k_dense_replace layers).", default=768)
    moe_intermediate_size: int = doc("Hidden width F of each routed/shared expert.", default=128)
    num_hidden_layers: int = doc("Number of transformer blocks.", default=4)
    num_attention_heads: int = doc("Attention heads H.", default=4)
    n_shared_experts: int = doc("Shared experts (always active), fused into one MLP.", default=1)
    n_routed_experts: int = doc("Routed experts E per MoE layer.", default=16)
    num_experts_per_tok: int = doc("Routed experts K chosen per token.", default=4)
    n_group: int = doc("Expert groups for group-limited routing (1 = no grouping).", default=1)
    topk_group: int = doc("Groups kept per token.", default=1)
    routed_scaling_factor: float = doc("Multiplier on routed expert weights.", default=1.0)
    norm_topk_prob: bool = doc("Normalise the K gate weights to sum to 1.", default=True)
    scoring_func: str = doc("Router score: 'sigmoid' (V3) or 'softmax' (V2).", default="sigmoid")
    first_k_dense_replace: int = doc("The first k layers use a dense MLP instead of MoE.", default=1)
    q_lora_rank: int | None = doc("Low-rank query dimension (None = plain q projection).", default=None)
    kv_lora_rank: int = doc("Compressed KV latent dimension (what MLA caches).", default=64)
    qk_rope_head_dim: int = doc("Per-head dimension with RoPE (decoupled key shared across heads).", default=16)
    qk_nope_head_dim: int = doc("Per-head query/key dimension without RoPE.", default=32)
    v_head_dim: int = doc("Per-head value dimension.", default=32)
    rope_theta: float = doc("RoPE base.", default=10000.0)
    rope_scaling: dict | None = doc(
        "YaRN settings, as in HF: {type: 'yarn', factor, original_max_position_embeddings, beta_fast, "
        "beta_slow, mscale, mscale_all_dim}; None = plain RoPE.",
        default=None,
    )
    rope_interleave: bool = doc("RoPE dims are interleaved pairs (DeepSeek checkpoints) vs halves.", default=True)
    rms_norm_eps: float = doc("RMSNorm epsilon.", default=1e-6)
    max_position_embeddings: int = doc("Longest supported sequence.", default=4096)
    num_nextn_predict_layers: int = doc("Multi-token-prediction depth D (0 = off).", default=0)
    mtp_loss_weight: float = doc("Lambda: weight of the mean MTP loss (V3: 0.3 early, 0.1 late).", default=0.3)
    initializer_range: float = doc("Std of the normal weight init.", default=0.02)
    tie_word_embeddings: bool = doc("Share the embedding with the output head.", default=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first impossible setting; return self for chaining."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be positive or None, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"first_k_dense_replace={self.first_k_dense_replace} must be in "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive when there are dense layers")
        if self.num_moe_layers:
            if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ConfigError("n_routed_experts and moe_intermediate_size must be positive for MoE layers")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ConfigError("group-limited routing scores a group by its top-2 experts: "
                                  f"need at least 2 experts per group, got {per_group}")
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ConfigError(f"topk_group={self.topk_group} groups of {per_group} experts cannot supply "
                                  f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.n_shared_experts < 0:
                raise ConfigError("n_shared_experts must be >= 0")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers must be >= 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
            if kind == "yarn" and float(self.rope_scaling.get("factor", 0)) < 1:
                raise ConfigError("rope_scaling.factor must be >= 1 for YaRN")
        return self

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 under YaRN (DeepSeek-V3 `inference/model.py`)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True) -> "ModelConfig":
        """Build from a dict; unknown keys raise in strict mode (typos), are dropped otherwise (HF extras)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if strict and unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        try:
            cfg = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(str(e)) from None
        return coerce_types(cfg)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def coerce_types(cfg):
    """Convert values read from TOML/JSON/CLI strings to the field's declared type, or raise ConfigError."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type)
        if "None" in kind:
            value = decode_none(value)
        try:
            if value is None:
                if "None" not in kind:
                    raise ConfigError(f"{f.name} may not be empty")
            elif kind.startswith("int"):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif kind.startswith("float"):
                value = float(value)
            elif kind.startswith("bool"):
                value = parse_bool(value)
            elif kind.startswith("str"):
                value = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.name} must be of type {kind}, got {value!r}") from None
        setattr(cfg, f.name, value)
    return cfg


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


# --- presets -------------------------------------------------------------------------------------
# Published configs from DeepSeek-V3 `inference/configs` and the V2-Lite HF config (see
# shared/reference/deepseek-v3-facts.md). The big ones are for planning and meta-device construction.
_V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # Unit tests: every feature on, tiny sizes.
    "debug": dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                  first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512, num_nextn_predict_layers=1),
    # The default `moeforge train` run: about 5 minutes on a 2-core CPU.
    "tiny": dict(vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=1.0,
                 first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16,
                 qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=1),
    # `tiny` with image and speech encoders in front (moeforge.multimodal; docs/multimodal.md).
    "tiny-mm": dict(vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
                    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=1.0,
                    first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16,
                    qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=1),
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
                    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    norm_topk_prob=False, scoring_func="softmax", first_k_dense_replace=1, q_lora_rank=None,
                    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                    max_position_embeddings=163840,
                    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                    num_nextn_predict_layers=0),
    "v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
               num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
               num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
               q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
               max_position_embeddings=163840, rope_scaling=_V3_YARN, num_nextn_predict_layers=1),
}


# Training settings a preset recommends for its scale (priority: TrainConfig defaults < these < TOML < flags).
# DeepSeek-V3 moved the balancing bias by 1e-3 per step over ~10^5 steps; a 300-step CPU run needs a
# faster bias to balance at all (measured: MaxVio after 80 tiny steps 2.9 at 1e-3, 0.4 at 1e-2, same loss).
# For `tiny`, decaying it to 1e-3 and a stronger sequence-wise loss gave the best balance and validation
# loss of the variants in docs/balancing.md (the three-way table).
PRESET_TRAIN_DEFAULTS: dict[str, dict] = {
    "tiny": {"bias_update_speed": 1e-2, "bias_update_final_speed": 1e-3, "seq_aux_alpha": 1e-2},
    "debug": {"bias_update_speed": 1e-2},
    "tiny-mm": {"bias_update_speed": 1e-2, "bias_update_final_speed": 1e-3, "seq_aux_alpha": 1e-2,
                "multimodal": True, "batch_size": 4, "sample_tokens": 0},
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name]).validate()


# --- training --------------------------------------------------------------------------------------
# Pipeline schedules of `moeforge.parallel.pipeline` -> stages each pipeline rank runs.
PP_SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "dualpipev": 2}
ZERO_1_REFUSED = ("--zero 1 (shard only the optimizer state) is not implemented: FSDP2 shards the gradients with the "
                  "optimizer state; use --zero 2 (same updates, less memory per rank) or --zero 3")


@dataclass
class TrainConfig:
    """One training run. Every field is also a `moeforge train --flag`."""

    preset: str = doc("Model preset (debug, tiny, v2-lite, v3); [model] in the TOML overrides fields.", default="tiny")
    data: str | None = doc("Text file, folder, .jsonl, .parquet (file or folder), a `datasets` save_to_disk "
                           "folder, or .bin/.npy tokens; default: the Python standard library's source files.",
                           default=None)
    text_field: str = doc("The text column of .jsonl, parquet and Arrow data.", default="text")
    tokenizer: str | None = doc("Path to a Hugging Face tokenizer.json (default: byte-level).", default=None)
    max_corpus_mb: float = doc("Read at most this many MB of text from the corpus (a file, a folder or JSONL; "
                               "the last document is cut there). Token files are memory-mapped whole.",
                               default=16.0)
    val_fraction: float = doc("Fraction of documents held out for validation.", default=0.05)
    seq_len: int = doc("Tokens per training sequence.", default=256)
    batch_size: int = doc("Sequences per micro-batch.", default=16)
    grad_accum: int = doc("Micro-batches per optimizer step.", default=1)
    steps: int = doc("Optimizer steps.", default=300)
    lr: float = doc("Peak learning rate.", default=2e-3)
    min_lr_ratio: float = doc("Final learning rate as a fraction of the peak.", default=0.1)
    warmup_steps: int = doc("Linear warmup steps.", default=30)
    schedule: str = doc("Learning-rate decay after warmup: cosine or wsd (stable, then linear decay).",
                        default="cosine")
    wsd_decay_fraction: float = doc("WSD: fraction of steps spent decaying.", default=0.2)
    weight_decay: float = doc("AdamW weight decay (not applied to norms, biases, embeddings).", default=0.1)
    beta1: float = doc("AdamW beta1.", default=0.9)
    beta2: float = doc("AdamW beta2.", default=0.95)
    grad_clip: float = doc("Clip the global gradient norm to this (0 = off).", default=1.0)
    bias_update_speed: float = doc("Aux-loss-free balancing: gamma of bias += gamma*sign(mean-load) per step "
                                   "(0 = off).", default=1e-3)
    bias_update_final_speed: float | None = doc("Decay gamma geometrically to this by the last step "
                                                "(unset = constant).", default=None)
    bias_freeze_fraction: float = doc("Freeze the balancing bias after this fraction of the steps.", default=1.0)
    seq_aux_alpha: float = doc("Weight of DeepSeek-V3's sequence-wise balance loss (0 = off).", default=1e-4)
    batch_aux_alpha: float = doc("Weight of the classic batch-level auxiliary balance loss (0 = off).",
                                 default=0.0)
    routing: str = doc("learned; balanced: force a perfectly even expert assignment; hot:F: expert 0 of every MoE "
                       "layer gets F x the mean load, the rest share the remainder evenly (1 < F <= experts / "
                       "top-k). The last two are diagnostics.", default="learned")
    precision: str = doc("auto (bf16 where bf16 matmuls are fast: CUDA, AMX or AVX512-BF16 CPUs; else fp32; resolved "
                         "once and saved in config.toml), fp32, bf16 (autocast; weights and optimizer stay fp32), fp8 "
                         "(DeepSeek-V3's fine-grained FP8 linears and experts, the rest bf16; docs/precision.md) or "
                         "fp8-tensorwise.", default="auto")
    fp8_policy: bool = doc("With fp8: switch layers between FP8 and BF16 from their gradient and activation "
                           "statistics (logged as precision_switches).", default=False)
    optimizer_state_dtype: str = doc("AdamW moment dtype: fp32, or bf16 (master weights stay fp32; half the "
                                     "optimizer-state memory).", default="fp32")
    device: str = doc("auto, cpu or cuda.", default="auto")
    seed: int = doc("Seed for init, data order and sampling.", default=1234)
    eval_every: int = doc("Evaluate every N steps (and at the end).", default=100)
    eval_batches: int = doc("Validation micro-batches per evaluation.", default=8)
    log_every: int = doc("Write a metrics line every N steps.", default=1)
    log_expert_counts: bool = doc("Log per-layer, per-expert token counts (for `moeforge report --plot`).",
                                  default=True)
    save_every: int = doc("Checkpoint every N steps (and at the end); 0 = only at the end.", default=0)
    keep_checkpoints: int = doc("Keep this many most recent checkpoints.", default=2)
    max_bad_steps: int = doc("Stop after this many consecutive non-finite steps.", default=5)
    sample_tokens: int = doc("Tokens to generate as a sample at the end (0 = none).", default=200)
    sample_prompt: str = doc("Prompt for the end-of-run sample.", default="def ")
    multimodal: bool = doc("Also train image and speech encoders on synthetic image questions and espeak-ng "
                           "digit speech, mixed with the text (docs/multimodal.md; one process only).",
                           default=False)
    mm_batch_size: int = doc("Multimodal: image and speech sequences per step (each).", default=16)
    mm_examples: int = doc("Multimodal: training examples generated per modality.", default=4000)
    mm_answer_weight: float = doc("Multimodal: the loss weight of one image or speech answer token relative to "
                                  "one text token (docs/multimodal.md: 1 = every supervised token alike).",
                                  default=1.0)
    mm_encoder_lr: float = doc("Multimodal: the encoders' and projectors' learning rate as a multiple of --lr (same "
                               "schedule; docs/multimodal.md). 1 keeps the optimizer layout of runs before it.",
                               default=0.3)
    compile: bool = doc("torch.compile the model (faster steps, slower start).", default=False)
    tensorboard: bool = doc("Also log the metrics and expert-load heatmaps to RUN_DIR/tensorboard "
                            "(moeforge[logging]).", default=False)
    wandb: bool = doc("Also log to Weights & Biases (moeforge[wandb]; WANDB_MODE=offline needs no network).",
                      default=False)
    run_dir: str | None = doc("Run folder (default: runs/<preset>-<time>).", default=None)
    # Distributed runs (docs/distributed.md); checked by moeforge.parallel.ParallelLayout.
    nproc: int = doc("Processes to start on this machine; > 1 launches torchrun for you.", default=1)
    dp: int = doc("Data-parallel degree: ranks that see different tokens (0 = processes / (tp x pp)).", default=0)
    ep: int = doc("Expert-parallel degree, within dp: each rank holds n_routed_experts / ep experts.", default=1)
    ep_dispatch: str = doc("Expert parallelism: what the token rows travel as to their experts' ranks: compute "
                           "(the compute dtype, bf16 under bf16/fp8 precision), fp8 (E4M3 + one fp32 scale per "
                           "1x128 tile, as DeepSeek-V3) or logfmt (LogFMT-8); results return in the compute dtype. "
                           "fp8/logfmt need ep > 1.", default="compute")
    ep_overlap_shared: bool = doc("Expert parallelism: compute the shared experts while the dispatch all-to-all "
                                  "is in flight (same results).", default=True)
    redundant_experts: int = doc("Expert parallelism: R extra physical expert slots per MoE layer (R / ep more per "
                                 "rank) holding copies of the hottest experts, re-placed every --rebalance-every "
                                 "steps from the measured loads (same losses as without; docs/balancing.md).",
                                 default=0)
    rebalance_every: int = doc("With --redundant-experts: re-plan the expert placement from the loads of the last K "
                               "steps every K steps, moving weights and AdamW moments to their new slots.",
                               default=0)
    tp: int = doc("Tensor-parallel degree.", default=1)
    cp: int = doc("Context-parallel degree: ranks sharing each sequence (2 x cp chunks, load-balanced; MLA's "
                  "compressed KV all-gathered); composes with dp only (docs/long-context.md).", default=1)
    pp: int = doc("Pipeline-parallel degree: ranks holding consecutive blocks of the model (pp > 1 runs alone "
                  "or with dp, ep and tp, --nproc = pp x dp x tp, stages replicated over dp, no --zero 3; "
                  "docs/parallel-tp-pp.md).", default=1)
    pp_schedule: str = doc("Pipeline schedule: gpipe, 1f1b, interleaved-1f1b or dualpipev (the last two run two "
                           "stages per rank).", default="1f1b")
    pp_microbatches: int = doc("Pipeline micro-batches per optimizer step (0 = one per stage: pp, or 2 x pp for "
                               "interleaved-1f1b and dualpipev); must divide batch_size x grad_accum / dp.",
                               default=0)
    zero: int = doc("FSDP2 sharding over dp: 3 = reshard parameters after forward (ZeRO-3); 2 = keep them "
                    "gathered until backward (ZeRO-2). ZeRO-1 (optimizer state only) is not implemented. With "
                    "--pp > 1 nothing is sharded (stages are replicated over dp; --zero 3 is refused there).",
                    default=2)
    dist_timeout: float = doc("Seconds a collective waits for its peers before the run fails.", default=600.0)
    activation_checkpointing: str = doc("Recompute activations in backward: none, full (every block), selective "
                                        "(MLA up-projections, SwiGLUs) or auto (least recompute within "
                                        "--memory-budget); see docs/memory.md.", default="none")
    memory_budget: str | None = doc("auto checkpointing: activation budget in bytes (2e9, 1.5GiB) or as a "
                                    "fraction of the activations without checkpointing (0.5).", default=None)
    offload: str = doc("GPU runs: move to CPU memory none, optimizer (states between steps), activations "
                       "(save_on_cpu) or all.", default="none")

    def validate(self) -> "TrainConfig":
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_checkpoints",
                     "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ConfigError("steps, warmup_steps, save_every and eval_every must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio must be in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction must be in (0, 1)")
        from .balance.losses import parse_routing

        parse_routing(self.routing)
        if self.bias_update_final_speed is not None and self.bias_update_final_speed < 0:
            raise ConfigError("bias_update_final_speed must be >= 0")
        if min(self.bias_update_speed, self.seq_aux_alpha, self.batch_aux_alpha) < 0:
            raise ConfigError("bias_update_speed, seq_aux_alpha and batch_aux_alpha must be >= 0")
        if not 0 <= self.bias_freeze_fraction <= 1:
            raise ConfigError("bias_freeze_fraction must be in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp8", "fp8-tensorwise"):
            raise ConfigError(f"precision must be auto, fp32, bf16, fp8 or fp8-tensorwise, got {self.precision!r}")
        if self.fp8_policy and not self.precision.startswith("fp8"):
            raise ConfigError("fp8_policy needs --precision fp8 or fp8-tensorwise")
        if self.mm_answer_weight <= 0:
            raise ConfigError(f"mm_answer_weight must be > 0, got {self.mm_answer_weight}")
        if self.mm_encoder_lr <= 0:
            raise ConfigError(f"mm_encoder_lr must be > 0, got {self.mm_encoder_lr}")
        if self.optimizer_state_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"optimizer_state_dtype must be fp32 or bf16, got {self.optimizer_state_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.activation_checkpointing not in ("none", "full", "selective", "auto"):
            raise ConfigError(f"activation_checkpointing must be none, full, selective or auto, got "
                              f"{self.activation_checkpointing!r}")
        if self.ep_dispatch not in ("compute", "fp8", "logfmt"):
            raise ConfigError(f"ep_dispatch must be compute, fp8 or logfmt, got {self.ep_dispatch!r}")
        if self.ep_dispatch != "compute" and self.ep == 1:
            raise ConfigError(f"ep_dispatch={self.ep_dispatch} needs ep > 1: with ep=1 no tokens are exchanged "
                              "(use --ep-dispatch compute)")
        check_redundant_experts(self)
        if self.offload not in ("none", "optimizer", "activations", "all"):
            raise ConfigError(f"offload must be none, optimizer, activations or all, got {self.offload!r}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"pp_schedule must be {', '.join(PP_SCHEDULES)}, got {self.pp_schedule!r}")
        if self.zero not in (2, 3):  # also in one process: a flag that is accepted must act
            raise ConfigError(ZERO_1_REFUSED if self.zero == 1 else f"--zero must be 2 or 3, got {self.zero}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"pp_microbatches must be >= 0 (0 = one per pipeline stage), got {self.pp_microbatches}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train config field(s): {', '.join(unknown)}")
        return coerce_types(cls(**d))


@dataclass
class RunConfig:
    """What a run folder's config.toml holds: the resolved model and training configs."""

    model: ModelConfig
    train: TrainConfig

    def to_toml(self) -> str:
        return "[train]\n" + dict_to_toml(dataclasses.asdict(self.train)) + "\n[model]\n" + dict_to_toml(
            self.model.to_dict())


# --- resuming a run --------------------------------------------------------------------------------
# Training fields a resume may change freely: bookkeeping, and where and how the same computation runs
# (layout, memory, device, compile; a new layout can differ from the old one in the last bits of fp32
# sums, as it does in a fresh run; ep_dispatch is the layout's codec, and fp8/logfmt need ep > 1, so it
# has to change with --ep). Every other field (seed, batch, data, optimizer, precision, all model fields,
# ...) changes what is computed, so a resume refuses it unless --allow-config-change names it. `steps` may
# change too: the schedules are functions of (step, steps), see docs/training.md.
RESUME_FREE_FIELDS = frozenset({
    "steps", "run_dir", "eval_every", "eval_batches", "log_every", "log_expert_counts", "save_every",
    "keep_checkpoints", "max_bad_steps", "sample_tokens", "sample_prompt", "compile", "device",
    "nproc", "dp", "ep", "tp", "pp", "cp", "pp_schedule", "pp_microbatches", "zero", "ep_dispatch",
    "ep_overlap_shared", "redundant_experts", "rebalance_every", "dist_timeout", "activation_checkpointing",
    "memory_budget", "offload"})


def config_changes(saved: dict, run: RunConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for each field of `run` that differs from `saved`
    ({"train": {...}, "model": {...}} as a checkpoint stores them). Fields the saved run did not record
    (older versions) are not compared, nor `precision = "auto"` (runs before it was resolved and saved)."""
    changes = []
    for section, new in (("train", dataclasses.asdict(run.train)), ("model", run.model.to_dict())):
        old = saved.get(section) or {}
        for name, value in new.items():
            if name not in old or old[name] == value or (name == "precision" and old[name] == "auto"):
                continue
            changes.append((name, old[name], value))
    return changes


def check_resume_config(saved: dict, run: RunConfig, step: int, allow: tuple[str, ...] | str = ()) -> str | None:
    """Refuse (ConfigError, one line) a resume whose config breaks exact continuation of the saved run
    (`step`: the checkpoint's), unless `allow` names the changed fields; -> a one-line note of what
    changed, or None."""
    if isinstance(allow, str):
        allow = tuple(a.strip() for a in allow.split(",") if a.strip())
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(allow) - known)
    if unknown:
        raise ConfigError(f"--allow-config-change: unknown field(s) {', '.join(unknown)}")
    changes = config_changes(saved, run)
    described = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
    refused = [name for name, _, _ in changes if name not in RESUME_FREE_FIELDS and name not in allow]
    if refused:
        them = "it" if len(refused) == 1 else "them"
        raise ConfigError(f"--resume: the config differs from the checkpoint's ({described}); "
                          f"{', '.join(refused)} would not continue the run exactly: pass "
                          f"--allow-config-change {','.join(refused)} to change {them} anyway, or drop the flag(s)")
    if run.train.steps < step:
        raise ConfigError(f"--resume: --steps {run.train.steps} is before the checkpoint's step {step}")
    return f"config changed on resume: {described}" if changes else None


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (expected [train] and [model])")
    return data


def resolve_run_config(toml: dict | None = None, train_overrides: dict | None = None,
                       model_overrides: dict | None = None) -> RunConfig:
    """Merge, in increasing priority: preset (model, recommended training settings) < TOML [model]/[train]
    < command-line overrides."""
    toml = toml or {}
    chosen = {**toml.get("train", {}), **(train_overrides or {})}
    recommended = PRESET_TRAIN_DEFAULTS.get(chosen.get("preset", TrainConfig.preset), {})
    train = TrainConfig.from_dict({**recommended, **chosen}).validate()
    base = dataclasses.asdict(preset(train.preset))
    model_dict = {**base, **toml.get("model", {}), **(model_overrides or {})}
    model = ModelConfig.from_dict(model_dict).validate()
    check_routing(train, model)
    return RunConfig(model=model, train=train)


def check_redundant_experts(train: TrainConfig) -> None:
    """--redundant-experts R --rebalance-every K against the layout flags (one line for the first problem)."""
    R, K = train.redundant_experts, train.rebalance_every
    if R < 0:
        raise ConfigError(f"--redundant-experts must be >= 0, got {R}")
    if R == 0:
        if K != 0:
            raise ConfigError(f"--rebalance-every {K} needs --redundant-experts R > 0 (without extra slots there is "
                              "nothing to re-place)")
        return
    if train.ep < 2:
        raise ConfigError(f"--redundant-experts {R} needs expert parallelism (--ep > 1): the extra slots are spread "
                          "over the ep ranks")
    if R % train.ep:
        raise ConfigError(f"--redundant-experts {R} must divide evenly over the ep={train.ep} ranks (a multiple of "
                          f"{train.ep})")
    if K < 1:
        raise ConfigError(f"--rebalance-every must be >= 1 with --redundant-experts (steps between re-placements), "
                          f"got {K}")
    for flag, value in (("--pp", train.pp), ("--tp", train.tp), ("--cp", train.cp)):
        if value > 1:
            raise ConfigError(f"--redundant-experts with {flag} {value}: redundant experts run with dp x ep only")
    if train.ep_dispatch != "compute":
        raise ConfigError(f"--redundant-experts with --ep-dispatch {train.ep_dispatch}: replicated slots send rows "
                          "in the compute dtype only (use --ep-dispatch compute)")


def check_routing(train: TrainConfig, model: ModelConfig) -> None:
    """--routing hot:F against the model's experts (one line if F is out of range)."""
    from .balance.losses import check_hot_factor, parse_routing

    mode, factor = parse_routing(train.routing)
    if mode == "hot":
        check_hot_factor(factor, model.n_routed_experts, model.num_experts_per_tok)


# TOML has no null. A field that may be None (q_lora_rank, rope_scaling, data, ...) is written as the string
# "none" when it is None, the spelling `-m FIELD=none` uses too; reading maps it back (also inside inline
# tables). Omitting the key instead would let the preset's value come back on the next read (a resumed
# `-m q_lora_rank=none` model would grow a q_a_proj). A file literally named "none" is "./none".
NONE = "none"


def decode_none(value):
    """The string "none" (any case) -> None; inside a dict, each such value too."""
    if isinstance(value, str) and value.strip().lower() == NONE:
        return None
    if isinstance(value, dict):
        return {k: decode_none(v) for k, v in value.items()}
    return value


def dict_to_toml(d: dict) -> str:
    """Write a flat dict (plus inline tables) as TOML; None is written as "none" (see NONE)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in d.items())


def toml_value(v) -> str:
    if v is None:
        return json.dumps(NONE)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
