"""benchmarks/train_throughput.py's fp8 row: moeforge's model there is a real FP8 model (its linears and
experts swapped, the fp32 model left alone) with the same weights, and the whole benchmark runs end to
end at toy size with its rows printed (transformers as the only peer: always installed for the tests)."""

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_throughput  # noqa: E402

from moeforge.precision.modules import Fp8GroupedExperts, Fp8Linear  # noqa: E402

TOY = ["--hidden", "128", "--layers", "2", "--vocab", "256", "--batch", "2", "--seq", "32", "--heads", "2",
       "--moe-intermediate", "128", "--dense-intermediate", "256", "--q-lora-rank", "128", "--kv-lora-rank", "128",
       "--nope-dim", "32", "--rope-dim", "16", "--v-dim", "32", "--experts", "4", "--top-k", "2",
       "--peak-n", "128", "--steps", "1", "--warmup", "1", "--peers", "transformers", "--threads", "1"]


def _loss_column(out: str, dtype: str) -> dict[str, float]:
    """model name -> loss@1 of the `dtype` rows of the printed table."""
    rows = [re.match(rf"^{dtype}\s+(.+?)\s+\d+\s+\d+\s", line) for line in out.splitlines()]
    return {m.group(1): float(m.string.split()[-1]) for m in rows if m}


def test_fp8_row_runs_moeforge_fp8_beside_transformers_bf16(capsys):
    assert train_throughput.main(TOY + ["--dtype", "fp32,fp8"]) == 0
    out = capsys.readouterr().out
    fp32, fp8 = _loss_column(out, "fp32"), _loss_column(out, "fp8")
    assert set(fp8) == {"transformers (bf16: no FP8 training)", "moeforge grouped_mm/eager fp8 emulated"}, fp8
    ref = fp32["transformers"]
    for name, loss in fp8.items():  # same weights and batch: FP8 / bf16 rounding moves the loss a little
        assert abs(loss - ref) < 2e-2 * ref, (name, loss, ref)
    assert fp8["moeforge grouped_mm/eager fp8 emulated"] != fp32["moeforge grouped_mm/eager"]  # not the fp32 model


def test_fp8_models_swap_a_copy():
    args = train_throughput.parse_args(TOY + ["--dtype", "fp8"])
    models = train_throughput.build_models(args, [torch.float32])
    hf, ours, _ = models[torch.float32]
    (hf8, ours8, titan8), backend, _ = train_throughput.fp8_models(args, hf, ours)
    assert hf8 is hf and titan8 is None and backend == "emulated"
    swapped = [m for m in ours8.modules() if isinstance(m, (Fp8Linear, Fp8GroupedExperts))]
    assert any(isinstance(m, Fp8GroupedExperts) for m in swapped) and len(swapped) > 4
    assert not any(isinstance(m, (Fp8Linear, Fp8GroupedExperts)) for m in ours.modules())
    for (n, p), (n8, p8) in zip(ours.state_dict().items(), ours8.state_dict().items()):
        if n == n8:
            assert torch.equal(p, p8), n
