"""Training checkpoints: a Hugging Face layout folder (loadable by `from_pretrained` and `transformers`)
plus `trainer_state.pt` (optimizer, step, RNG), written atomically.

A checkpoint is first written to a hidden temporary folder, fsynced, and then renamed into place; a
crash mid-write leaves at worst a stray temporary folder, never a half-written `step-N`, and older
checkpoints are pruned only after the new one is in place. `remove_stale_temporaries` (called when a run
starts or resumes) deletes those strays, and puts back a checkpoint that a crash caught while re-saving
the same step (moved aside to `.old-step-N-PID`, its replacement not yet renamed in).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .hf import read_config_json, save_pretrained, verify_safetensors

log = logging.getLogger(__name__)

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
    """The newest intact checkpoint of a run (None if it has none at all); newer corrupt ones are skipped
    with a warning each (e.g. truncated by a full disk or a copy after the atomic rename). If every one
    is corrupt, CheckpointError names the newest one's problem."""
    ckpts = list_checkpoints(run_dir)
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for p in problems:
                log.warning(f"skipping corrupt checkpoint: {p}; using {ckpt.name}")
            return ckpt
        problems.append(problem)
    if problems:
        raise CheckpointError(f"{run_dir}: all {len(ckpts)} checkpoint(s) are corrupt, newest: {problems[0]}")
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be loaded (config.json, the safetensors headers and sizes, the torch
    zip archives: cheap checks that read no tensor data), or None."""
    try:
        read_config_json(ckpt)
        verify_safetensors(ckpt)
    except CheckpointError as e:
        return str(e)
    for archive in sorted(Path(ckpt).glob("*.pt")):
        try:
            zipfile.ZipFile(archive).close()  # torch.save writes a zip; truncation loses its directory
        except (zipfile.BadZipFile, OSError) as e:
            return f"{archive}: truncated or corrupt ({e})"
    return None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A HF folder or a checkpoint folder as is, or a run folder -> its newest intact checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no config.json and no checkpoints in it")
    return latest


TEMPORARY = re.compile(r"^\.(tmp|old)-(step-\d+)(-\d+)?$")


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete the temporary folders of crashed single-process saves; -> the names removed or restored.
    Only one process writes a run's checkpoints (rank 0 in a distributed run), and it calls this before
    its first save, so no temporary folder here can belong to a save in progress."""
    base = checkpoints_dir(run_dir)
    if not base.is_dir():
        return []
    done = []
    for path in sorted(base.iterdir()):
        m = TEMPORARY.match(path.name)
        if not m or not path.is_dir():
            continue
        final = base / m[2]
        if m[1] == "old" and not final.exists():  # the swap in save_checkpoint was cut short: undo it
            path.rename(final)
            done.append(f"{path.name} -> {final.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(path.name)
    if done:
        _fsync_dir(base)
    return done


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, keep: int = 2,
                    card: dict | None = None) -> Path:
    """Write step-N atomically, then prune all but the `keep` most recent checkpoints (`card`: training
    facts for the model card)."""
    base = checkpoints_dir(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step-{step:06d}"
    tmp = base / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, card=card)
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
