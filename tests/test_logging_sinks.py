"""--tensorboard and --wandb: the same rows as metrics.jsonl, read back with each tool's own reader, once
per step also across a resume."""

import importlib.util
import json
import os
import sys

import pytest

from conftest import small_run
from moeforge.checkpoint import latest_checkpoint
from moeforge.errors import ConfigError
from moeforge.train import Trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """6 steps with --tensorboard (and --wandb offline when installed): checkpoint at 3, killed inside step 5
    (step 4 already logged), resumed to the end."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    env = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = dict(steps=6, save_every=3, eval_every=3, eval_batches=1, tensorboard=True, wandb=HAS_WANDB)
        first = Trainer(small_run(tmp_path, **settings))
        real = first.model.forward

        def killed_in_step_5(*args, **kwargs):
            if first.step == 4:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        first.forward = killed_in_step_5
        with pytest.raises(KeyboardInterrupt):
            first.fit()
        if HAS_WANDB:  # what wandb's exit hook does when the killed process ends
            import wandb

            wandb.finish()
        assert latest_checkpoint(tmp_path / "run").name == "step-000003"
        Trainer(small_run(tmp_path, **settings), resume=True).fit()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    return run_dir, rows


def test_tensorboard_events_hold_every_metric_once_per_step_after_a_resume(resumed_run):
    run_dir, rows = resumed_run
    tb_dir = run_dir / "tensorboard"
    raw_loss_steps = []  # what the files hold, before TensorBoard applies the resume's purge_step
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            raw_loss_steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
    assert sorted(raw_loss_steps) == [1, 2, 3, 4, 4, 5, 6]  # step 4 came twice: the reader must drop one

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    n_moe = len(rows[0]["expert_load_max_over_mean"])
    expected = {"train/loss", "train/lm_loss", "train/mtp_loss", "train/aux_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "val/loss", "balance/max_vio"} | {f"balance/max_vio_layer_{i}"
                                                                          for i in range(n_moe)}
    assert expected <= tags
    for tag, field in [("train/loss", "loss"), ("train/lm_loss", "lm_loss"), ("train/mtp_loss", "mtp_loss"),
                       ("train/aux_loss", "aux_loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                       ("train/tokens_per_s", "tokens_per_s"), ("balance/max_vio", "max_vio")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(1, 7)), tag
        assert [e.value for e in events] == pytest.approx([r[field] for r in rows], rel=1e-6), tag
    last_layer = acc.Scalars(f"balance/max_vio_layer_{n_moe - 1}")
    assert [e.value for e in last_layer] == pytest.approx([r["expert_load_max_over_mean"][-1] - 1 for r in rows],
                                                          abs=1e-6)
    val = acc.Scalars("val/loss")  # pytest.approx compares flat sequences only (9.2 refuses nested ones)
    evaluated = [r for r in rows if "val_loss" in r]
    assert [e.step for e in val] == [r["step"] for r in evaluated]
    assert [e.value for e in val] == pytest.approx([r["val_loss"] for r in evaluated])
    heatmaps = acc.Images("balance/expert_load")
    assert [e.step for e in heatmaps] == [3, 6]
    assert heatmaps[0].encoded_image_string.startswith(b"\x89PNG") and heatmaps[0].width > 100


def wandb_records(path):
    """The protobuf records of a .wandb file (LevelDB log blocks behind a 7-byte ':W&B' header)."""
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield pending
            pending = b""


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'moeforge[wandb]')")
def test_wandb_offline_run_writes_its_files_once_per_step_after_a_resume(resumed_run):
    from wandb.proto import wandb_internal_pb2

    run_dir, rows = resumed_run
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # two runs of the process, one W&B run id
    logged = []
    for f in files:
        for data in wandb_records(f):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged.append(items)
    assert [int(h["_step"]) for h in logged] == list(range(1, 7))
    assert [h["train/loss"] for h in logged] == pytest.approx([r["loss"] for r in rows])
    assert [h["val/loss"] for h in logged if "val/loss" in h] == pytest.approx([r["val_loss"] for r in rows
                                                                                   if "val_loss" in r])
    images = [(int(h["_step"]), h["balance/expert_load/path"]) for h in logged if "balance/expert_load/path" in h]
    assert [step for step, _ in images] == [3, 6]
    assert all(any((f.parent / "files" / path).is_file() for f in files) for _, path in images)


def test_missing_logging_package_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'moeforge\[wandb\]'"):
        Trainer(small_run(tmp_path, steps=1, wandb=True)).fit()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'moeforge\[logging\]'"):
        Trainer(small_run(tmp_path / "b", steps=1, tensorboard=True)).fit()
