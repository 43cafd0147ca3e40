import os
import sysconfig
from pathlib import Path

import pytest
import torch

from moeforge.config import resolve_run_config

# Tiny models: one intra-op thread is fastest and keeps spawned ranks from oversubscribing a small machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A small folder of real text that exists wherever Python does.
SMALL_CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def small_run(tmp_path, **train):
    """The debug preset on a small real corpus: a few seconds per dozen steps on a laptop CPU."""
    settings = dict(preset="debug", data=str(SMALL_CORPUS), seq_len=32, batch_size=4, steps=6, warmup_steps=2,
                    eval_every=3, eval_batches=2, sample_tokens=0, precision="fp32", device="cpu",
                    run_dir=str(tmp_path / "run"))
    settings.update(train)
    return resolve_run_config({}, settings)
