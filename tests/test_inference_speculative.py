"""MTP speculative decoding: greedy output identical to plain greedy, the acceptance rule exact."""

import torch

from moeforge.inference import SamplingParams, generate
from moeforge.inference.speculative import MTPSpeculativeDecoder, accept_draft
from test_inference_decode import debug_model, one_thread  # noqa: F401 (autouse fixture)


class OracleDrafter(MTPSpeculativeDecoder):
    """Drafts the known greedy answer, except a wrong token every third draft: exercises both paths."""

    def __init__(self, model, answer):
        super().__init__(model)
        self.answer, self.calls = answer, 0

    def draft(self, mtp_logits, generator):
        self.calls += 1
        right = self.answer[len(self.output)]
        token = right if self.calls % 3 else (right + 1) % 256
        return token, torch.nn.functional.one_hot(torch.tensor(token), 256).float()


def test_greedy_mtp_equals_plain_greedy():
    model = debug_model()
    prompt = [7, 8, 9, 10, 11]
    plain = generate(model, [prompt], 20)[0]
    decoder = MTPSpeculativeDecoder(model)
    assert decoder.generate(prompt, 20) == plain
    s = decoder.stats
    assert s.drafted > 0 and 0 <= s.accepted <= s.drafted and s.tokens == 19
    assert decoder.generate(prompt, 20, stop_ids=(plain[5],)) == plain[:plain.index(plain[5]) + 1]


def test_accepted_drafts_keep_the_output_and_save_forwards():
    model = debug_model()
    prompt = [3, 1, 4, 1, 5]
    plain = generate(model, [prompt], 16)[0]
    decoder = OracleDrafter(model, plain)
    assert decoder.generate(prompt, 16) == plain
    s = decoder.stats
    assert 1 <= s.accepted < s.drafted and s.accepted >= s.drafted // 2  # both paths taken
    assert s.main_forwards == 15 - s.accepted  # each accepted draft saves one main-model forward


def test_acceptance_rule_samples_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.6])
    counts = torch.zeros(4)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    for d in drafts.tolist():
        _, token = accept_draft(p, q, d, g, greedy=False)
        counts[token] += 1
    torch.testing.assert_close(counts / n, p, atol=0.015, rtol=0)


def test_sampled_mtp_is_seeded():
    model = debug_model()
    params = SamplingParams(temperature=1.0, top_k=20)
    a = MTPSpeculativeDecoder(model, params, seed=1).generate([1, 2, 3], 12)
    assert a == MTPSpeculativeDecoder(model, params, seed=1).generate([1, 2, 3], 12) and len(a) == 12
