"""A moeforge model as an lm-evaluation-harness model (`@register_model("moeforge")`).

The harness owns tasks, prompts, few-shot sampling, metrics and its results format; this class only answers
its three questions, in batches:
- loglikelihood: log p(continuation | context) and whether greedy decoding would produce it;
- loglikelihood_rolling: log p(document), scored in disjoint windows of the model's context length
  (the harness's own window helpers, as its Hugging Face model does);
- generate_until: greedy (or sampled) text with the latent-KV-cache decoder, cut at the stop strings.
Scores come from the model's logits in fp32 (log_softmax), whatever the autocast dtype of the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

# The harness registers its built-in models only when its registry is empty at the first get_model:
# load them before ours, or registering "moeforge" would hide every built-in model from that process.
import lm_eval.models  # noqa: E402,F401

from ..errors import ConfigError
from ..inference.generation import generate
from ..inference.sampling import SamplingParams


@register_model("moeforge")
class MoeforgeLM(TemplateLM):
    """`model` + `tokenizer` (a moeforge Transformer and tokenizer) with `autocast_dtype`, or `pretrained`: a
    checkpoint folder, with `precision` auto | fp32 | bf16 (`lm_eval.simple_evaluate(model="moeforge",
    model_args="pretrained=DIR,precision=bf16")` after importing this module)."""

    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 16,
                 device: str = "auto", precision: str = "auto", autocast_dtype: torch.dtype | None = None,
                 seed: int = 1234, max_batch_size: int | None = None):
        super().__init__()
        if str(batch_size).startswith("auto") or max_batch_size is not None:
            raise ConfigError("the moeforge harness model takes a fixed batch_size (no auto / max_batch_size)")
        if model is None:
            from .. import hardware
            from ..inference.cli import load_for_inference

            if precision not in ("auto", "fp32", "bf16"):
                raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
            model, tokenizer, _, _folder = load_for_inference(pretrained, tokenizer, device)
            autocast_dtype = hardware.autocast_dtype(precision, hardware.probe(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.autocast_dtype, self.seed = autocast_dtype, seed
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._device = next(model.parameters()).device
        self.max_length = model.config.max_position_embeddings

    # --- tokens -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _autocast(self):
        return torch.autocast(self._device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    # --- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """[(key, context ids, continuation ids)] -> [(log p(continuation | context), greedy)], longest first
        in right-padded batches (causal attention: padding on the right changes no earlier position)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        size = override_bs or self.batch_size
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            rows = []
            for i in chunk:
                _, context, continuation = requests[i]
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                inputs = whole[:-1]
                rows.append((inputs, whole[len(whole) - min(len(continuation), len(inputs)):]))
            width = max(len(inputs) for inputs, _ in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=self._device)
            for b, (inputs, _) in enumerate(rows):
                ids[b, :len(inputs)] = torch.as_tensor(inputs, dtype=torch.long)
            with self._autocast():
                logits = self.model(ids).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for b, (i, (inputs, target)) in enumerate(zip(chunk, rows)):
                positions = torch.arange(len(inputs) - len(target), len(inputs), device=self._device)
                target_ids = torch.as_tensor(target, dtype=torch.long, device=self._device)
                picked = logprobs[b, positions]
                score = float(picked.gather(-1, target_ids[:, None]).sum())
                greedy = bool((picked.argmax(-1) == target_ids).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(document): disjoint prediction windows, each seeing up to max_length tokens before it."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            rolling = harness_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(harness_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings through the cached batched decoder."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            params = SamplingParams(temperature, kwargs.pop("top_k", None), kwargs.pop("top_p", None))
            budget = max(1, self.max_length - max_new)
            stop = (self.tokenizer.eos_id,) if self.tokenizer.eos_id is not None else ()
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-budget:] or [self.eot_token_id] for i in chunk]
                new = generate(self.model, prompts, max_new, params, seed=self.seed, stop_ids=stop,
                               autocast_dtype=self.autocast_dtype)
                for i, tokens in zip(chunk, new):
                    text = self.tok_decode([t for t in tokens if t not in stop])
                    for s in until:
                        if s:
                            text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
