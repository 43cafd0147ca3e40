"""`moeforge train --nproc 2 --cp 2` as a user runs it: each sequence is split over the two ranks; the logged
losses, gradient norms, validation losses and expert counts, and the Hugging Face export, equal a
single-process run's. Layouts context parallelism is not built for are refused in one line."""


import pytest
import torch

from moeforge.cli import main
from moeforge.hf import read_safetensors
from parallel_helpers import one_thread, read_metrics
from test_parallel_train import SMALL

KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "val_loss")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def check_equal(run, single, step: int = 3):
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        for key in KEYS:
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
        assert a["expert_counts"] == b["expert_counts"], a["step"]
    got = read_safetensors(run / "checkpoints" / f"step-{step:06d}")
    want = read_safetensors(single / "checkpoints" / f"step-{step:06d}")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)


def test_context_parallel_run_matches_single_process(tmp_path, capfd):
    single, run = tmp_path / "single", tmp_path / "cp"
    common = [*SMALL, "--steps", "3", "--save-every", "3", "--log-expert-counts", "--seq-aux-alpha", "1e-2"]
    assert main(["train", *common, "--run-dir", str(single)]) == 0
    assert main(["train", *common, "--run-dir", str(run), "--nproc", "2", "--cp", "2"]) == 0
    assert "cp 2" in capfd.readouterr().err
    check_equal(run, single)
    assert "dp 1, ep 1, tp 1, pp 1, cp 2" in (run / "checkpoints" / "step-000003" / "README.md").read_text()


def test_data_x_context_parallel_run_matches_single_process(tmp_path):
    single, run = tmp_path / "single", tmp_path / "dpcp"
    common = [*SMALL, "--steps", "3", "--save-every", "3", "--log-expert-counts", "--seq-aux-alpha", "1e-2"]
    assert main(["train", *common, "--run-dir", str(single)]) == 0
    assert main(["train", *common, "--run-dir", str(run), "--nproc", "4", "--cp", "2"]) == 0  # dp 2 x cp 2
    check_equal(run, single)


TWO_STEPS = [*SMALL, "--steps", "2", "--save-every", "2", "--log-expert-counts", "--seq-aux-alpha", "1e-2"]


@pytest.fixture(scope="module")
def single_two_steps(tmp_path_factory):
    """The one-process reference of the 2-step 4-rank runs (shared by them)."""
    run = tmp_path_factory.mktemp("single") / "run"
    with one_thread():
        assert main(["train", *TWO_STEPS, "--run-dir", str(run)]) == 0
    return run


def test_context_x_expert_parallel_run_matches_single_process(tmp_path, single_two_steps):
    """dp 2 (ep 2) x cp 2: each EP group exchanges the tokens of one context chunk, and the experts' gradients
    are reduced over edp x cp."""
    run = tmp_path / "epcp"
    assert main(["train", *TWO_STEPS, "--run-dir", str(run), "--nproc", "4", "--cp", "2", "--ep", "2"]) == 0
    check_equal(run, single_two_steps, step=2)
    assert all(m["ep_dispatch_bytes"] > 0 for m in read_metrics(run))  # tokens really crossed EP ranks


def test_context_x_tensor_parallel_run_matches_single_process(tmp_path, single_two_steps):
    """cp 2 x tp 2: each rank attends with its heads over the gathered latents."""
    run = tmp_path / "tpcp"
    assert main(["train", *TWO_STEPS, "--run-dir", str(run), "--nproc", "4", "--cp", "2", "--tp", "2"]) == 0
    check_equal(run, single_two_steps, step=2)


def test_layouts_context_parallelism_is_not_built_for_fail_in_one_line(tmp_path, capfd):
    for nproc, flags, message in (
            ("4", ["--cp", "2", "--pp", "2"], "cp=2 with pp=2: context parallelism composes with data, expert and "
                                              "tensor parallelism only"),
            ("2", ["--cp", "2", "--seq-len", "30"], "seq_len=30 must be a multiple of 2 x cp = 4"),
            ("2", ["--cp", "2", "--activation-checkpointing", "full"], "--activation-checkpointing is not applied "
                                                                       "with context parallelism"),
            ("2", ["--cp", "3"], "does not divide the 2 processes")):
        assert main(["train", *SMALL, "--steps", "1", "--run-dir", str(tmp_path / "x"), "--nproc", nproc, *flags]) == 2
        err = capfd.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_context_extension_resume_changes_cp_freely_and_length_and_yarn_when_allowed():
    """examples/long_context_finetune.py continues a short run with --cp, a longer --seq-len and YaRN: the
    layout (cp) changes freely, what changes the computation only when named."""
    import dataclasses

    from moeforge.config import check_resume_config, resolve_run_config
    from moeforge.errors import ConfigError

    saved_run = resolve_run_config({}, {"preset": "debug", "seq_len": 32})
    saved = {"train": dataclasses.asdict(saved_run.train), "model": saved_run.model.to_dict()}
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32}
    assert "cp 1 -> 2" in check_resume_config(saved, resolve_run_config({}, {"preset": "debug", "seq_len": 32,
                                                                             "nproc": 2, "cp": 2}), step=4)
    longer = resolve_run_config({}, {"preset": "debug", "seq_len": 128, "nproc": 2, "cp": 2}, {"rope_scaling": yarn})
    with pytest.raises(ConfigError, match="--allow-config-change seq_len,rope_scaling"):
        check_resume_config(saved, longer, step=4)
    assert "seq_len 32 -> 128" in check_resume_config(saved, longer, step=4, allow="seq_len,rope_scaling")
