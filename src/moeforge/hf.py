"""Hugging Face checkpoint layout (DeepseekV3 and DeepseekV2): config.json <-> ModelConfig, safetensors <->
model, and `PretrainedTransformer`, the model with `from_pretrained` / `save_pretrained`.

This layer depends on the model, never the reverse. The name mapping is short: names are the same apart
from the `model.` prefix, routed experts (one tensor per expert in the file, stacked [E, ...] here) and MTP
layers (layer ids from num_hidden_layers on in the file, `mtp.{k}` here). Loading reads one tensor at a
time from the safetensors files into a model built on the meta device, converted to its target dtype as
it is read (FP8 weights with `weight_scale_inv` are dequantised block by block): there is no second full
copy of the weights. What loads and what does not: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import Router, Transformer
from .model_card import write_model_card
from .safetensors_reader import SafetensorsReader

log = logging.getLogger(__name__)

FP8_BLOCK = 128
# Tensors transformers keeps in fp32 whatever the model's dtype (its `_keep_in_fp32_modules_strict`):
# routing decisions must not change with the weights' dtype.
KEEP_FP32 = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
_MTP = re.compile(r"mtp\.(\d+)\.(.+)$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
# Per MTP layer, the released layout repeats the main model's embedding and head: not read, written as copies.
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
# config.json keys that describe the architecture: written from the ModelConfig, never copied from the source.
_ARCH_KEYS = {"architectures", "model_type", "topk_method", "torch_dtype", "dtype", "quantization_config",
              "transformers_version", "rope_scaling", "rope_parameters", "n_group", "topk_group", "num_mtp_layers"}


# --- config ----------------------------------------------------------------------------------------
def config_from_hf(d: dict) -> ModelConfig:
    """Read a HF DeepseekV3 or DeepseekV2 config.json dict, old (rope_scaling) or v5 (rope_parameters) style,
    with the semantics transformers gives each field (e.g. DeepseekV2 always routes by softmax and never
    renormalises its top-k weights)."""
    d = dict(d)
    v2 = d.get("model_type") == "deepseek_v2" or "DeepseekV2ForCausalLM" in (d.get("architectures") or ())
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
    if v2:
        # transformers' DeepseekV2TopkRouter: softmax scores, greedy or group-limited (group = its best
        # expert) top-k, weights x routed_scaling_factor, no renormalisation, no correction bias; the
        # rotary embedding is complex multiplication of adjacent pairs (= interleaved).
        method = d.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {method!r} is not supported for DeepseekV2 "
                              "(greedy, group_limited_greedy)")
        if method == "greedy":
            d["n_group"] = d["topk_group"] = 1
        if d.get("norm_topk_prob"):
            log.warning("config.json: norm_topk_prob=True is ignored for DeepseekV2, as transformers does")
        d.update(scoring_func="softmax", norm_topk_prob=False, rope_interleave=True)
    else:
        d.setdefault("scoring_func", "sigmoid")
    if d.get("num_nextn_predict_layers") is None:
        d["num_nextn_predict_layers"] = d.get("num_mtp_layers") or 0
    if d.get("n_routed_experts") is None:  # a dense model
        d.update(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=1,
                 first_k_dense_replace=d.get("num_hidden_layers", 1))
    if d.get("first_k_dense_replace") is None:
        d["first_k_dense_replace"] = 0
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ConfigError(f"{flag}=True is not supported")
    try:
        return ModelConfig.from_dict(d, strict=False).validate()
    except TypeError as e:
        raise ConfigError(f"config.json: {e}") from None


def export_layout(config: ModelConfig, state: Mapping[str, torch.Tensor] | None = None) -> str:
    """'deepseek_v2' for a model transformers' DeepseekV2 reproduces (softmax routing, no renormalisation,
    zero correction bias, interleaved rope), else 'deepseek_v3' (which moeforge always reloads exactly)."""
    if config.scoring_func != "softmax" or config.norm_topk_prob or not config.rope_interleave:
        return "deepseek_v3"
    biases = [t for k, t in (state or {}).items() if k.endswith("e_score_correction_bias")]
    return "deepseek_v2" if all(not b.any() for b in biases) else "deepseek_v3"


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32, layout: str = "deepseek_v3",
                 base: dict | None = None) -> dict:
    """config.json for `layout`; `base` (the source's config.json) keeps fields moeforge does not model
    (token ids, generation settings)."""
    d = {k: v for k, v in (base or {}).items() if k not in _ARCH_KEYS}
    d.update(config.to_dict())
    d.update(num_key_value_heads=config.num_attention_heads, hidden_act="silu", attention_bias=False,
             torch_dtype=str(dtype).removeprefix("torch."))
    if layout == "deepseek_v2":
        d.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", mlp_bias=False,
                 topk_method="group_limited_greedy" if config.n_group > 1 else "greedy")
    else:
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", topk_method="noaux_tc")
        if config.scoring_func == "softmax":
            log.warning("exporting softmax routing in the DeepseekV3 layout: moeforge reloads it exactly, "
                        "transformers' DeepseekV3 would route by sigmoid")
    if d["rope_scaling"] is None:
        del d["rope_scaling"]
    return d


# --- names -------------------------------------------------------------------------------------------
def hf_name(name: str, config: ModelConfig) -> str:
    """The HF name of a moeforge state-dict entry (for stacked experts: the fused v5 name)."""
    m = _MTP.match(name)
    if m:
        layer, rest = config.num_hidden_layers + int(m[1]), m[2]
        rest = rest.removeprefix("block.") if rest.startswith("block.") else (
            "shared_head.norm.weight" if rest == "norm.weight" else rest)
        return f"model.layers.{layer}.{rest}"
    return name if name == "lm_head.weight" else f"model.{name}"


def expert_parts(name: str, config: ModelConfig) -> list[list[str]] | None:
    """For a stacked expert tensor, the per-expert HF names of each part along dim 1 ([gate], [up] for
    gate_up_proj; [down] for down_proj); None for any other tensor."""
    n = config.n_routed_experts
    for suffix, parts in (("mlp.experts.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.experts.down_proj", ("down_proj",))):
        if name.endswith(suffix):
            base = hf_name(name, config).removesuffix(suffix.removeprefix("mlp.experts."))
            return [[f"{base}{e}.{part}.weight" for e in range(n)] for part in parts]
    return None


def hf_keys(name: str, config: ModelConfig, available: set[str] | Mapping) -> list[str]:
    """The HF tensors a moeforge entry is read from: its own name, or for stacked experts the per-expert
    tensors unless the file holds the fused [E, ...] tensor."""
    parts, key = expert_parts(name, config), hf_name(name, config)
    return [key] if parts is None or key in available else [k for part in parts for k in part]


def _shell(config: ModelConfig, dtype: torch.dtype | None = None, cls: type = None) -> Transformer:
    """The model on the meta device (no memory); with `dtype`, routing stays fp32 (KEEP_FP32)."""
    with torch.device("meta"):
        model = (cls or Transformer)(config)
    if dtype is not None:
        model.to(dtype)
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.weight = torch.nn.Parameter(router.weight.float(), requires_grad=router.weight.requires_grad)
            router.e_score_correction_bias = router.e_score_correction_bias.float()
    return model


# --- loading -----------------------------------------------------------------------------------------
def hf_to_moeforge(tensors: Mapping[str, torch.Tensor], config: ModelConfig,
                   like: Mapping[str, torch.Tensor] | None = None, skip: frozenset[str] = frozenset()
                   ) -> dict[str, torch.Tensor]:
    """A HF state dict (a dict, or the lazy `read_safetensors` folder) in this model's names, shapes and
    dtypes (`like`: the target's state dict, meta tensors are fine; default: a fresh fp32 model's). Read
    one tensor at a time; routed experts are read into one preallocated stack per layer. Entries in
    `skip` are checked by name but not read (nor returned)."""
    like = like if like is not None else _shell(config).state_dict()
    available = set(tensors.keys())
    # Names first (cheap), so that a mismatched folder fails before any tensor is read.
    sources: dict[str, list[str]] = {}
    missing: list[str] = []
    for name in like:
        if name == "lm_head.weight" and config.tie_word_embeddings and "lm_head.weight" not in available:
            continue  # tied: the embedding (load_into re-ties)
        keys = hf_keys(name, config, available)
        if name.endswith("e_score_correction_bias") and config.scoring_func == "softmax" and keys[0] not in available:
            keys = []  # DeepseekV2 has no correction bias: zeros
        missing.extend(k for k in keys if k not in available)
        sources[name] = keys
    used = {k for keys in sources.values() for k in keys}
    mtp_layers = {int(m[1]) for k in available if (m := _LAYER.match(k)) and m[2] == "eh_proj.weight"}
    unexpected = sorted(k for k in available - used if not _ignorable(k, config, mtp_layers))
    check_names_match(missing, unexpected, getattr(tensors, "folder", "checkpoint"))
    out: dict[str, torch.Tensor] = {}
    for name, keys in sources.items():
        if name in skip:
            continue
        target = like[name]
        if keys == [hf_name(name, config)]:  # one tensor (also a fused expert stack)
            if isinstance(tensors, SafetensorsFolder):  # converted (FP8: dequantised) as it is read
                out[name] = tensors.read_into(keys[0], torch.empty(target.shape, dtype=target.dtype))
            else:
                out[name] = _check_shape(tensors[keys[0]], target, keys[0]).to(target.dtype)
            continue
        stack = torch.empty(target.shape, dtype=target.dtype)  # [E, parts x width, ...], expert by expert
        if keys:
            n_parts = len(keys) // config.n_routed_experts
            width = target.shape[1] // n_parts
            for i, key in enumerate(keys):
                p, e = divmod(i, config.n_routed_experts)
                part = stack[e, p * width:(p + 1) * width]
                if isinstance(tensors, SafetensorsFolder):  # straight from the file, no temporary
                    tensors.read_into(key, part)
                else:
                    part.copy_(_check_shape(tensors[key], part, key))
        else:
            stack.zero_()
        out[name] = stack
    return out


def _check_shape(t: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}, the config expects {tuple(target.shape)}")
    return t


def _ignorable(key: str, config: ModelConfig, mtp_layers: set[int]) -> bool:
    """File tensors that are not read: rotary tables, transformers' empty shared experts when there are
    none, MTP copies of the embedding and head, MTP layers (those with an eh_proj) beyond the configured
    depth."""
    if key.endswith("rotary_emb.inv_freq") or (config.n_shared_experts == 0 and ".mlp.shared_experts." in key):
        return True
    m = _LAYER.match(key)
    if m and int(m[1]) in mtp_layers:
        return int(m[1]) >= config.num_hidden_layers + config.num_nextn_predict_layers or m[2] in _MTP_SHARED
    return False


def config_for_checkpoint(config: ModelConfig, names: set[str], source: str = "checkpoint") -> ModelConfig:
    """Drop the MTP module when the files hold no MTP weights at all (transformers' own save_pretrained
    writes num_nextn_predict_layers=1 but never the layer); partial MTP weights are an error."""
    D = config.num_nextn_predict_layers
    if not D:
        return config
    expected = [k for name in _shell(config).state_dict() if name.startswith("mtp.")
                for k in hf_keys(name, config, names)]
    present = [k for k in expected if k in names]
    if not present:
        log.warning(f"{source}: config.json sets num_nextn_predict_layers={D} but the checkpoint has no MTP "
                    "weights; loading the main model without the MTP module")
        return ModelConfig.from_dict({**config.to_dict(), "num_nextn_predict_layers": 0}).validate()
    absent = [k for k in expected if k not in names
              and not (k.endswith("e_score_correction_bias") and config.scoring_func == "softmax")]
    if absent:
        raise CheckpointError(f"{source}: incomplete MTP weights: missing {len(absent)} tensor(s) of "
                              f"num_nextn_predict_layers={D}, e.g. {absent[:3]}")
    return config


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """weight [O, I] in FP8 times its per-block scale [ceil(O/block), ceil(I/block)] -> fp32, or into `out`
    (any float dtype, e.g. bf16) one row of blocks at a time: the product is taken in fp32 either way, but
    no fp32 copy of the whole weight is ever made."""
    O, I = weight.shape
    expected = (-(-O // block), -(-I // block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                              f"{(O, I)} in {block}x{block} blocks (expected {expected})")
    if out is None:
        out = torch.empty(O, I, dtype=torch.float32)
    for i in range(expected[0]):
        rows = slice(i * block, min(O, (i + 1) * block))
        scale = scale_inv[i].float().repeat_interleave(block)[:I]
        out[rows] = weight[rows].float() * scale
    return out


class SafetensorsFolder(Mapping):
    """The tensors of a folder (one file, or shards with an index) as a read-on-access mapping: each file's
    header is checked on opening (a truncated file names itself), each tensor is read when asked for, and
    FP8 weights come back dequantised (their `weight_scale_inv` keys are hidden)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            paths = [self.folder / f for f in files]
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.folder}: no .safetensors files")
        self.block = FP8_BLOCK
        config = self.folder / "config.json"
        if config.is_file():
            try:
                quant = json.loads(config.read_text()).get("quantization_config") or {}
                self.block = int((quant.get("weight_block_size") or [FP8_BLOCK])[0])
            except (json.JSONDecodeError, TypeError, ValueError):
                pass  # config.json errors are reported by whoever reads the config
        self._files: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{p}: listed in the index but missing")
            for key in self._open(p).keys():
                self._where[key] = p
        scales = {k for k in self._where if k.endswith(".weight_scale_inv")}
        for key in scales:
            if key.removesuffix("_scale_inv") not in self._where:
                raise CheckpointError(f"{key} has no matching {key.removesuffix('_scale_inv')}")
        self._keys = [k for k in self._where if k not in scales]

    def _open(self, path: Path) -> SafetensorsReader:
        if path not in self._files:
            try:
                self._files[path] = SafetensorsReader(path)
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None
        return self._files[path]

    def _read(self, key: str, out: torch.Tensor | None = None, index: int | None = None) -> torch.Tensor:
        path = self._where[key]
        try:
            if out is None:
                return self._open(path).read(key, index)
            self._open(path).read_into(key, out, index)
            return out
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read {key} ({e})") from None

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with tensor `key` (any dtype and shape-compatible target), straight from the file
        when the dtypes match (no temporary), through one converted temporary otherwise."""
        if tuple(out.shape) != self.shape(key):
            raise CheckpointError(f"{key} has shape {self.shape(key)}, the config expects {tuple(out.shape)}")
        scale = key + "_scale_inv"
        if scale in self._where:  # FP8: dequantised straight into out's dtype (no fp32 copy of the tensor)
            return dequantize_fp8_block(self._read(key), self._read(scale), self.block, out=out)
        if self._open(self._where[key]).entries[key][0] == out.dtype:
            return self._read(key, out)
        return out.copy_(self[key])

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (the one holding the most bytes): what loading
        "as stored" means. FP8 block-quantised weights count as bf16, the dtype DeepSeek dequantises them to."""
        sizes: dict[torch.dtype, int] = {}
        for key, path in self._where.items():
            dtype, shape, begin, end = self._open(path).entries[key]
            if key.endswith(".weight_scale_inv") or not dtype.is_floating_point:
                continue
            if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                dtype = torch.bfloat16
            sizes[dtype] = sizes.get(dtype, 0) + end - begin
        return max(sizes, key=sizes.get) if sizes else torch.float32

    def shape(self, key: str) -> tuple[int, ...]:
        return self._open(self._where[key]).shape(key)

    def expert(self, key: str, index: int) -> torch.Tensor:
        """Slice [index] of a stacked [E, ...] tensor, reading only that slice."""
        return self._read(key, index=index)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where or key.endswith(".weight_scale_inv"):
            raise KeyError(key)
        t = self._read(key)
        scale = key + "_scale_inv"
        if scale in self._where:
            return dequantize_fp8_block(t, self._read(scale), self.block)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{self._where[key]}: {key} is FP8 without a {scale}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._where and not str(key).endswith(".weight_scale_inv")


def read_safetensors(folder: str | Path) -> SafetensorsFolder:
    """All tensors of a folder, read lazily (see `SafetensorsFolder`)."""
    return SafetensorsFolder(folder)


def verify_safetensors(folder: str | Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupt weights file of a folder (reads
    only the headers)."""
    SafetensorsFolder(folder)


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_config(folder: Path) -> ModelConfig:
    return config_from_hf(read_config_json(folder))


def from_pretrained(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    cls: type | None = None, routed_experts: bool = True) -> "PretrainedTransformer":
    """Build a model from a Hugging Face DeepseekV3 / DeepseekV2 folder (run folders: `moeforge.from_pretrained`).

    dtype None loads fp32; with a dtype every tensor is converted to it as it is read, except the router
    weight and correction bias, which stay fp32 (as transformers keeps them). routed_experts=False checks
    the routed experts' names but leaves their stacked weights unread, on the meta device (no memory):
    for an expert cache that reads experts on demand (`moeforge.inference.expert_cache`)."""
    folder = Path(folder)
    raw = read_config_json(folder)
    tensors = read_safetensors(folder)
    config = config_for_checkpoint(config_from_hf(raw), set(tensors.keys()), source=str(folder))
    model = _shell(config, dtype, cls or PretrainedTransformer)
    like = model.state_dict()
    skip = frozenset() if routed_experts else frozenset(k for k in like if expert_parts(k, config) is not None)
    load_into(model, hf_to_moeforge(tensors, config, like=like, skip=skip), source=str(folder), skip=skip)
    model = materialize(model, device)
    model.hf_config = raw
    return model.eval()


def check_names_match(missing: list[str], unexpected: list[str], source) -> None:
    """One CheckpointError line naming (a few of) the missing and unexpected tensors, if there are any."""
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}")
    raise CheckpointError(f"{source} does not match the model config: " + "; ".join(parts))


def load_into(model: Transformer, state: dict[str, torch.Tensor], source: str = "checkpoint",
              skip: frozenset[str] = frozenset()) -> None:
    """load_state_dict with errors that say which tensors are missing, unexpected or the wrong shape
    (`skip`: entries left as they are)."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    check_names_match(missing, unexpected, source)
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config expects "
                                  f"{tuple(expected[k].shape)}")
    # assign=True only for a meta-device model; otherwise copy in place so optimizers keep their params.
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=not skip, assign=on_meta)
    if on_meta and model.config.tie_word_embeddings:  # assign made two Parameters: one again
        model.lm_head.weight = model.embed_tokens.weight


def materialize(model: Transformer, device) -> Transformer:
    """Move a model loaded with assign=True to `device` and rebuild its non-persistent buffers."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:  # only non-persistent buffers are left on meta after load_into
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    model.rotary.reset()
    return model._apply(lambda t: t if t.is_meta else t.to(device))  # tensors left unread stay on meta


# --- saving ------------------------------------------------------------------------------------------
def moeforge_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig,
                   layout: str = "deepseek_v3") -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_moeforge`, as views (no copies): per-expert tensors, `model.` prefix, MTP at
    layer ids >= num_hidden_layers with the released layout's copies of the embedding and head; the
    DeepseekV2 layout has no correction bias (`export_layout` picks it only when the bias is zero)."""
    out: dict[str, torch.Tensor] = {}
    head = state["lm_head.weight"] if "lm_head.weight" in state else state["embed_tokens.weight"]
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if layout == "deepseek_v2" and name.endswith("e_score_correction_bias"):
            continue
        parts = expert_parts(name, config)
        if parts is None:
            out[hf_name(name, config)] = t
        else:
            width = t.shape[1] // len(parts)
            for p, part in enumerate(parts):
                for e, key in enumerate(part):
                    out[key] = t[e, p * width:(p + 1) * width]
        if name.endswith("mlp.gate.weight") and config.n_shared_experts == 0:  # transformers' empty MLP
            D, prefix = t.shape[1], hf_name(name, config).removesuffix("gate.weight") + "shared_experts."
            empty = state["embed_tokens.weight"].new_empty
            out.update({f"{prefix}gate_proj.weight": empty(0, D), f"{prefix}up_proj.weight": empty(0, D),
                        f"{prefix}down_proj.weight": empty(D, 0)})
        m = _MTP.match(name)
        if m and m[2] == "norm.weight":
            layer = config.num_hidden_layers + int(m[1])
            out[f"model.layers.{layer}.embed_tokens.weight"] = state["embed_tokens.weight"]
            out[f"model.layers.{layer}.shared_head.head.weight"] = head
    return out


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, card: dict | None = None) -> None:
    """Write config.json, README.md (model card; `card` = training facts) and
    model(-0000k-of-0000n).safetensors (+ index when sharded) in the layout transformers reads
    (`export_layout`). dtype: cast to it (the router weight and bias stay fp32, as in transformers' own
    files); None keeps each tensor's dtype. One shard is materialised at a time."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model-*-of-*.safetensors"), path / "model.safetensors",
                  path / "model.safetensors.index.json"]:  # an earlier export's shards would be read too
        stale.unlink(missing_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layout = export_layout(model.config, state)
    hf_state = moeforge_to_hf(state, model.config, layout)

    def target_dtype(key: str, t: torch.Tensor) -> torch.dtype:
        keep = dtype is None or not t.is_floating_point() or key.endswith(KEEP_FP32)
        return t.dtype if keep else dtype

    def converted(key: str, t: torch.Tensor) -> torch.Tensor:
        # Experts are views of one stack and the MTP copies share memory, which safetensors refuses: copy.
        x = t.to("cpu", target_dtype(key, t))
        return (x.clone() if x.data_ptr() == t.data_ptr() else x).contiguous()

    out_dtype = dtype or next(model.parameters()).dtype
    base = getattr(model, "hf_config", None)
    config = config_to_hf(model.config, out_dtype, layout, base)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_model_card(path, model.config, card)
    itemsize = {k: torch.empty((), dtype=target_dtype(k, t)).element_size() for k, t in hf_state.items()}
    shards, current, size = [], [], 0
    for k, t in hf_state.items():
        nbytes = t.numel() * itemsize[k]
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, keys in zip(names, shards):
        save_file({k: converted(k, hf_state[k]) for k in keys}, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(hf_state[k].numel() * itemsize[k] for k in hf_state)
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


class PretrainedTransformer(Transformer):
    """The model plus Hugging Face I/O, like transformers' PreTrainedModel: `moeforge.Transformer`.

    `hf_config` holds the config.json a model was loaded from, so that `save_pretrained` keeps its fields
    moeforge does not model (token ids and the like)."""

    hf_config: dict | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "PretrainedTransformer":
        return from_pretrained(folder, dtype=dtype, device=device, cls=cls)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None,
                        max_shard_bytes: int = 5 * 2**30, card: dict | None = None) -> None:
        """Write the Hugging Face layout (config.json + safetensors + model card), see
        `moeforge.hf.save_pretrained`."""
        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes, card=card)
