"""`moeforge generate` with the latent KV cache, --mtp and --expert-budget agree with the reference path."""

from moeforge.cli import main
from test_inference_decode import debug_model, one_thread  # noqa: F401 (autouse fixture)


def test_generate_paths_agree(tmp_path, capsys):
    debug_model().save_pretrained(tmp_path / "ckpt")
    base = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def ", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu"]
    outputs = {}
    for name, extra in {"reference": ["--no-cache"], "cached": [], "mtp": ["--mtp"],
                        "experts": ["--expert-budget", "3"],
                        "expert-memory": ["--expert-memory", "0.0001", "--expert-policy", "lfu"]}.items():
        assert main(base + extra) == 0
        captured = capsys.readouterr()
        outputs[name] = captured.out
        if name == "mtp":
            assert "drafts accepted" in captured.err
        if name == "experts":
            assert "3 experts per MoE layer" in captured.err and "hit rate" in captured.err
            assert "prediction recall" in captured.err
        if name == "expert-memory":  # 100 kB holds 4 experts of 24.6 kB in all
            assert "4 experts in all" in captured.err
    assert len(set(outputs.values())) == 1, outputs
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x" * 600, "--device", "cpu"]) == 2
    assert "context" in capsys.readouterr().err


def test_no_cache_refuses_flags_it_cannot_honour(tmp_path, capsys):
    base = ["generate", "--checkpoint", str(tmp_path / "missing"), "--no-cache", "--device", "cpu"]
    for extra, flag in ((["--mtp"], "--mtp"), (["--expert-budget", "3"], "--expert-budget")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--no-cache" in err and flag in err


def test_bad_expert_budget_flags_are_one_line_errors(tmp_path, capsys):
    debug_model().save_pretrained(tmp_path / "ckpt")
    base = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--max-new-tokens", "1"]
    for extra, words in ((["--expert-budget", "0"], "--expert-budget must be >= 1"),
                         (["--expert-memory", "-1"], "--expert-memory must be > 0"),
                         (["--expert-memory", "0.00001"], "holds no expert"),
                         (["--expert-budget", "2", "--expert-memory", "1"], "give one of them")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
