"""The modality x expert heatmap of a multimodal run (`moeforge report --plot`)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_modality_load(run_dir: Path, out_dir: Path) -> list[Path]:
    """modality_expert_load.png from summary.json's expert_load_by_modality (nothing if absent)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return []
    shares = json.loads(path.read_text()).get("expert_load_by_modality")
    if not shares:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(shares)
    grid = np.array([shares[m] for m in names])  # [modalities, layers, experts], shares of routed slots
    n_layers, n_experts = grid.shape[1], grid.shape[2]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.1 * n_layers), squeeze=False)
    for layer in range(n_layers):
        ax = axes[layer, 0]
        im = ax.imshow(grid[:, layer] * n_experts, aspect="auto", cmap="magma", vmin=0)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylabel(f"MoE layer {layer}", fontsize=8)
        fig.colorbar(im, ax=ax, label="load / uniform")
    axes[-1, 0].set_xlabel("routed expert")
    fig.suptitle("expert load per modality (held-out data)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "modality_expert_load.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]
