"""Hugging Face DeepseekV3 checkpoint layout: config.json <-> ModelConfig, safetensors <-> model.

The mapping is a short table: names are the same apart from the `model.` prefix, routed experts
(one tensor per expert in the file, stacked [E, ...] here), and MTP layers (layer ids from
num_hidden_layers on in the file, `mtp.{k}` here). FP8 weights with `weight_scale_inv` (128x128 blocks)
are dequantised on load.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import Transformer
from .model_card import write_model_card

FP8_BLOCK = 128
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
_MTP_SHARED = {"embed_tokens.weight", "shared_head.head.weight"}  # copies of the main model's


# --- config ----------------------------------------------------------------------------------------
def config_from_hf(d: dict) -> ModelConfig:
    """Read a HF DeepseekV3 (or V2) config.json dict, old (rope_scaling) or v5 (rope_parameters) style."""
    d = dict(d)
    rope = d.pop("rope_parameters", None) or {}
    if "rope_theta" not in d and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if d.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if d.get("rope_scaling"):
        rs = dict(d["rope_scaling"])
        rs["type"] = rs.pop("rope_type", rs.get("type"))
        d["rope_scaling"] = rs if rs["type"] not in (None, "default") else None
    if d.get("q_lora_rank") is None:
        d["q_lora_rank"] = None
    for key in ("n_group", "topk_group"):
        if d.get(key) is None:
            d[key] = 1
    if d.get("n_routed_experts") is None:  # a dense model
        d.update(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=1,
                 first_k_dense_replace=d.get("num_hidden_layers", 1))
    if d.get("first_k_dense_replace") is None:
        d["first_k_dense_replace"] = 0
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if d.get("attention_bias"):
        raise ConfigError("attention_bias=True is not supported")
    try:
        return ModelConfig.from_dict(d, strict=False).validate()
    except TypeError as e:
        raise ConfigError(f"config.json: {e}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    d = config.to_dict()
    d.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        num_key_value_heads=config.num_attention_heads,
        hidden_act="silu",
        attention_bias=False,
        topk_method="noaux_tc",
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if d["rope_scaling"] is None:
        del d["rope_scaling"]
    return d


# --- state dict mapping ------------------------------------------------------------------------
def hf_to_moeforge(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and stack a HF state dict (already dequantised) into this model's names."""
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for name, t in tensors.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _EXPERT.match(name)
        if m:
            experts[int(m[1])][m[3]][int(m[2])] = t
            continue
        m = _LAYER.match(name)
        if m and int(m[1]) >= L:  # an MTP layer
            k, rest = int(m[1]) - L, m[2]
            if k >= config.num_nextn_predict_layers or rest in _MTP_SHARED:
                continue
            if rest in _MTP_OWN:
                out[f"mtp.{k}.{rest}"] = t
            elif rest == "shared_head.norm.weight":
                out[f"mtp.{k}.norm.weight"] = t
            else:
                out[f"mtp.{k}.block.{rest}"] = t
            continue
        out[name] = t
    for layer, parts in experts.items():
        prefix = _module_prefix(layer, L)
        n = config.n_routed_experts
        for part in ("gate_proj", "up_proj", "down_proj"):
            if sorted(parts[part]) != list(range(n)):
                raise CheckpointError(f"layer {layer}: expected {n} experts' {part}, found {len(parts[part])}")
        gate = torch.stack([parts["gate_proj"][e] for e in range(n)])
        up = torch.stack([parts["up_proj"][e] for e in range(n)])
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat((gate, up), dim=1)
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    return out


def _module_prefix(layer: int, L: int) -> str:
    return f"layers.{layer}" if layer < L else f"mtp.{layer - L}.block"


def moeforge_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_moeforge`: per-expert tensors, `model.` prefix, MTP at layer ids >= L."""
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = re.match(r"mtp\.(\d+)\.(.+)$", name)
        if m:
            layer, rest = L + int(m[1]), m[2]
            if rest.startswith("block."):
                rest = rest.removeprefix("block.")
            elif rest == "norm.weight":
                rest = "shared_head.norm.weight"
            name = f"layers.{layer}.{rest}"
            if rest == "shared_head.norm.weight":  # the released layout repeats shared weights per MTP layer
                out[f"model.layers.{layer}.embed_tokens.weight"] = state["embed_tokens.weight"].clone()
                out[f"model.layers.{layer}.shared_head.head.weight"] = state["lm_head.weight"].clone()
        if name.endswith("mlp.experts.gate_up_proj"):
            F = t.shape[1] // 2
            base = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                out[f"model.{base}{e}.gate_proj.weight"] = t[e, :F]
                out[f"model.{base}{e}.up_proj.weight"] = t[e, F:]
            continue
        if name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"model.{base}{e}.down_proj.weight"] = t[e]
            continue
        out[name if name == "lm_head.weight" else f"model.{name}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """weight [O, I] in FP8 times its per-128x128-block scale [ceil(O/128), ceil(I/128)] -> fp32."""
    O, I = weight.shape
    expected = (-(-O // block), -(-I // block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                              f"{(O, I)} in {block}x{block} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]
    return weight.float() * scale


# --- files -------------------------------------------------------------------------------------------
def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder (single file or sharded with an index), FP8 blocks dequantised."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{folder}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the index but missing")
        try:
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None
    for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wkey = key.removesuffix("_scale_inv")
        if wkey not in tensors:
            raise CheckpointError(f"{key} has no matching {wkey}")
        tensors[wkey] = dequantize_fp8_block(tensors[wkey], tensors.pop(key))
    return tensors


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A HF folder, a moeforge checkpoint folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    if (path / "config.json").is_file():
        return path
    from .checkpoint import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no config.json and no checkpoints in it")
    return latest


def load_config(folder: Path) -> ModelConfig:
    try:
        return config_from_hf(json.loads((folder / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build a Transformer from a HF DeepseekV3-layout folder (or a moeforge checkpoint / run folder)."""
    folder = resolve_checkpoint_dir(path)
    config = load_config(folder)
    state = hf_to_moeforge(read_safetensors(folder), config)
    with torch.device("meta"):
        model = Transformer(config)
    load_into(model, state, source=str(folder))
    model = materialize(model, device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_into(model: Transformer, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict with errors that say which tensors are missing, unexpected or the wrong shape."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}")
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(parts))
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config expects "
                                  f"{tuple(expected[k].shape)}")
    # assign=True only for a meta-device model; otherwise copy in place so optimizers keep their params.
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=on_meta)


def materialize(model: Transformer, device) -> Transformer:
    """Move a model loaded with assign=True to `device` and rebuild its non-persistent buffers."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:  # only non-persistent buffers are left on meta after load_into
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    model.rotary.reset()
    return model.to(device)


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, card: dict | None = None) -> None:
    """Write config.json, README.md (model card; `card` = training facts) and
    model(-0000k-of-0000n).safetensors (+ index when sharded)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf_state = moeforge_to_hf(state, model.config)
    out_dtype = dtype or next(model.parameters()).dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, out_dtype), indent=2) + "\n")
    write_model_card(path, model.config, card)
    shards, current, size = [], {}, 0
    for k, v in hf_state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in hf_state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
