"""Training checkpoints: a Hugging Face layout folder (loadable by `from_pretrained` and `transformers`)
plus `trainer_state.pt` (optimizer, step, RNG), written atomically.

A checkpoint is first written to a hidden temporary folder and then renamed into place; a crash
mid-write leaves at worst a stray temporary folder, never a half-written `step-N`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from .errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (or a checkpoints folder), oldest first."""
    base = checkpoints_dir(run_dir)
    if not base.is_dir():
        base = Path(run_dir)
    if not base.is_dir():
        return []
    found = [(int(m[1]), p) for p in base.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, keep: int = 2) -> Path:
    """Write step-N atomically, then prune all but the `keep` most recent checkpoints."""
    from .hf import save_pretrained

    base = checkpoints_dir(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step-{step:06d}"
    tmp = base / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    publish(tmp, final)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def publish(tmp: Path, final: Path) -> None:
    """Make the complete folder `tmp` the checkpoint `final`: its files and entries fsynced, then renamed
    into place. An existing `final` (the same step saved again, e.g. after a resume) is moved aside first
    and deleted only once the new one is in place."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {STATE_FILE} (a model export, not a resumable checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbage pickles
        raise CheckpointError(f"{path}: corrupt trainer state ({type(e).__name__}: {e})") from None


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
