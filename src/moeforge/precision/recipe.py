"""Which modules run in FP8: a recipe, applied to a built model from outside (gpt-fast/torchao style
module swaps; parameters and state-dict names are unchanged, so checkpoints load either way).

DeepSeek-V3 (sec. 3.3) keeps the embedding, the output head, the MoE gating, the normalisation and the
attention core in BF16/FP32 and runs every other linear layer and the experts in FP8. Here the router,
norms and attention core are not nn.Linear and are never touched; the recipe only has to skip the
output head (and anything else named in `keep_high_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import ConfigError
from ..model.moe import GroupedExperts
from .gemm import BACKENDS
from .modules import Fp8GroupedExperts, Fp8Linear, Fp8Spec
from .quant import E4M3, E5M2


@dataclass(frozen=True)
class Fp8Recipe:
    name: str
    spec: Fp8Spec
    keep_high_precision: tuple[str, ...] = field(default=("lm_head",))  # module-name components kept

    def keeps(self, name: str) -> bool:
        return any(part in self.keep_high_precision for part in name.split("."))


RECIPES = {
    "fp8": Fp8Recipe("fp8", Fp8Spec("blockwise")),  # DeepSeek-V3: 1x128 tiles, 128x128 blocks, E4M3
    "fp8-tensorwise": Fp8Recipe("fp8-tensorwise", Fp8Spec("tensorwise")),  # one scale per tensor
    "fp8-pow2": Fp8Recipe("fp8-pow2", Fp8Spec("blockwise", pow2_scales=True)),  # UE8M0 scales
    "fp8-hybrid": Fp8Recipe("fp8-hybrid", Fp8Spec("blockwise", E4M3, E5M2)),  # E5M2 gradients
}


def get_recipe(name: str) -> Fp8Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown FP8 recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def apply_fp8(model: nn.Module, recipe: Fp8Recipe | str = "fp8", backend: str | None = None) -> list[str]:
    """Swap nn.Linear and GroupedExperts modules for FP8 versions, in place; returns the swapped names.
    `backend` (gemm.BACKENDS; the trainer passes `hardware.probe(...).fp8_gemm`) overrides the recipe's
    GEMM path, which is the emulation."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if backend is not None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown FP8 GEMM backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        recipe = replace(recipe, spec=replace(recipe.spec, backend=backend))
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if recipe.keeps(full) or isinstance(child, (Fp8Linear, Fp8GroupedExperts)):
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Fp8Linear.from_linear(child, recipe.spec))
            elif isinstance(child, GroupedExperts):
                setattr(module, child_name, Fp8GroupedExperts.from_experts(child, recipe.spec))
            else:
                continue
            swapped.append(full)
    return swapped


def fp8_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8GroupedExperts))]
