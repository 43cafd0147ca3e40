"""`moeforge eval` through lm-evaluation-harness on local tasks (task YAMLs over JSONL files made here, no hub):
the harness's loglikelihoods equal log-probabilities taken directly from the model's logits."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeforge.cli import main
from moeforge.config import PRESETS, ModelConfig
from moeforge.data import ByteTokenizer
from moeforge.generate import generate
from moeforge.hf import save_pretrained
from moeforge.model import Transformer

pytest.importorskip("lm_eval")

CONTEXT = 48  # max_position_embeddings: the long documents need several rolling windows

CHOICE = [{"question": "The capital of France is", "choices": ["Paris", "a cat", "blue"], "label": 0},
          {"question": "def add(a, b): return", "choices": ["a + b", "a * b"], "label": 0},
          {"question": "2 + 2 =", "choices": ["4", "5", "22", "four"], "label": 0}]
DOCS = [{"text": "import json\nprint(json.dumps({'a': 1}))\n"},
        {"text": "The quick brown fox jumps over the lazy dog. " * 3},  # > CONTEXT bytes: 3 windows
        {"text": "x"}]
PROMPTS = [{"prompt": "def f(x):", "answer": " return x"}, {"prompt": "Hello", "answer": ", world"}]

TASKS = {
    "mf_choice": ("choice.jsonl", CHOICE, """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""),
    "mf_rolling": ("docs.jsonl", DOCS, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
"""),
    "mf_generate": ("prompts.jsonl", PROMPTS, """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = ModelConfig(**{**PRESETS["debug"], "max_position_embeddings": CONTEXT, "num_nextn_predict_layers": 0})
    model = Transformer(config).eval()
    save_pretrained(model, tmp / "model")
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, (file, rows, body) in TASKS.items():
        (tmp / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp / file}\n"
            f"  cache_dir: {tmp / 'hf-cache'}\ntest_split: test\n" + body)
    code = main(["eval", "--checkpoint", str(tmp / "model"), "--tasks", ",".join(TASKS), "--include-path",
                 str(tasks), "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--bootstrap-iters", "0",
                 "--log-samples"])
    assert code == 0
    return model, json.loads((tmp / "model" / "eval-results.json").read_text())


def logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded forward's logits."""
    ids = torch.tensor([(context + continuation)[:-1]])  # the last token is predicted, never an input
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(continuation))


def test_multiple_choice_loglikelihoods_equal_the_models_log_probabilities(evaluated):
    model, out = evaluated
    tok = ByteTokenizer()
    samples = out["samples"]["mf_choice"]
    assert len(samples) == len(CHOICE)
    correct = 0
    for sample in samples:
        pairs = [(context, continuation) for context, continuation in sample["arguments"]]
        assert all(context == context.rstrip() for context, _ in pairs)  # no space moved into the continuation
        got = [resp[0][0] for resp in sample["resps"]]
        want = [logprob(model, tok.encode(c), tok.encode(x)) for c, x in pairs]
        assert got == pytest.approx(want, abs=1e-4)
        correct += int(max(range(len(want)), key=want.__getitem__) == sample["doc"]["label"])
    assert out["results"]["mf_choice"]["acc,none"] == pytest.approx(correct / len(CHOICE))


def test_rolling_loglikelihood_is_the_documents_log_probability_in_context_windows(evaluated):
    model, out = evaluated
    tok = ByteTokenizer()
    got = {s["doc"]["text"]: s["resps"][0][0] for s in out["samples"]["mf_rolling"]}
    for doc in DOCS:
        tokens = [tok.eos_id] + tok.encode(doc["text"])  # the harness conditions the first token on EOS
        want, scored = 0.0, 0
        while scored < len(tokens) - 1:  # windows of CONTEXT predictions, each seeing <= CONTEXT tokens
            end = min(scored + CONTEXT, len(tokens) - 1)
            first = max(0, end - CONTEXT)
            want += logprob(model, tokens[first:scored + 1], tokens[scored + 1:end + 1])
            scored = end
        assert got[doc["text"]] == pytest.approx(want, abs=1e-3), doc["text"][:20]
    n_bytes = sum(len(d["text"].encode()) for d in DOCS)
    total = sum(got.values())
    assert out["results"]["mf_rolling"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2))


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(evaluated):
    model, out = evaluated
    tok = ByteTokenizer()
    for sample in out["samples"]["mf_generate"]:
        prompt = sample["doc"]["prompt"]
        new = generate(model, tok.encode(prompt), 6, temperature=0, stop_ids=(tok.eos_id,))
        want = tok.decode([t for t in new if t != tok.eos_id]).split("\n")[0]
        assert sample["resps"][0][0] == want


def test_results_file_is_the_harness_format_and_bad_input_is_one_line(evaluated, tmp_path, capsys):
    _, out = evaluated
    assert set(out["results"]) == set(TASKS) and out["n-samples"]["mf_choice"]["effective"] == len(CHOICE)
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--tasks", "x", "--include-path", str(tmp_path)]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path), "--tasks", "x", "--include-path", str(tmp_path / "no")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "not a folder" in errors[1]


def test_bf16_batches_of_mixed_lengths_score_close_to_fp32_and_output_defaults_to_the_run_folder(evaluated):
    from moeforge.evaluation.cli import default_output
    from moeforge.evaluation.harness import MoeforgeLM

    model, _ = evaluated
    tok = ByteTokenizer()
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("x", " yz" * 30)]  # the last one truncates
    requests = [((c, x), tok.encode(c), tok.encode(x)) for c, x in pairs]
    fp32 = MoeforgeLM(model, tok, batch_size=3)._loglikelihood_tokens(requests)
    bf16 = MoeforgeLM(model, tok, batch_size=3, autocast_dtype=torch.bfloat16)._loglikelihood_tokens(requests)
    for (c, x), (got, _), (low, _) in zip(pairs, fp32, bf16):
        whole = (tok.encode(c) + tok.encode(x))[-(CONTEXT + 1):]
        n = min(len(tok.encode(x)), len(whole) - 1)
        want = logprob(model, whole[:-n], whole[-n:])
        assert got == pytest.approx(want, abs=1e-4) and low == pytest.approx(want, rel=0.05)
    assert default_output(Path("runs/a/checkpoints/step-000010")) == Path("runs/a/eval-results.json")
    assert default_output(Path("export")) == Path("export/eval-results.json")


def test_without_the_harness_installed_eval_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # importlib.util.find_spec -> None: not installed
    assert main(["eval", "--checkpoint", str(tmp_path), "--tasks", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("moeforge eval: error: moeforge eval needs lm-evaluation-harness: "
                                               "pip install 'moeforge[eval]'")
