"""Server batching: the engine decoding N waiting requests one by one (`--max-batch 1`) vs in batches
(`--max-batch B`), half greedy and half seeded temperature-1.0 sampling, on a random model (the `tiny`
preset by default). Prints tokens/s of each side by side and whether every request's text is identical
(it must be: each row has its own seeded generator).

    python benchmarks/serve_batching.py                       # 8 requests x 32 tokens, batch 4 vs 1
    python benchmarks/serve_batching.py --requests 16 --max-batch 8 --preset debug
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from moeforge.config import preset
from moeforge.data import ByteTokenizer
from moeforge.inference.engine import Engine, Job
from moeforge.inference.sampling import SamplingParams
from moeforge.model import Transformer


def run(model, max_batch: int, n: int, tokens: int) -> tuple[float, list[str], dict]:
    engine = Engine(model, ByteTokenizer(), max_queue=n, max_batch=max_batch)
    texts, done = [[] for _ in range(n)], threading.Semaphore(0)

    def on_event(i):
        def f(ev):
            if ev[0] == "text":
                texts[i].append(ev[1])
            elif ev[0] in ("done", "error"):
                done.release()
        return f

    prompts = [f"def function_{i}(x):" + " " * (i % 3) for i in range(n)]
    with engine.model_lock:  # all requests waiting when decoding starts
        engine.start()
        for i, p in enumerate(prompts):
            params = SamplingParams() if i % 2 == 0 else SamplingParams(1.0)
            engine.submit(Job(list(p.encode()), tokens, params, i, (), on_event(i)))
        start = time.perf_counter()
    for _ in range(n):
        done.acquire()
    seconds = time.perf_counter() - start
    engine.close()
    return n * tokens / seconds, ["".join(t) for t in texts], dict(engine.batch_sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset(args.preset)
    model = Transformer(config.validate()).eval()
    run(model, args.max_batch, 2, 4)  # warm-up
    alone, texts_alone, sizes_alone = run(model, 1, args.requests, args.tokens)
    batched, texts_batched, sizes_batched = run(model, args.max_batch, args.requests, args.tokens)
    print(f"{args.requests} requests x {args.tokens} new tokens, preset {args.preset}, {args.threads} thread(s)")
    print("| max_batch | batches (size: count) | tokens/s | vs one by one |")
    print("|---|---|---|---|")
    print(f"| 1 | {sizes_alone} | {alone:.1f} | 1.00x |")
    print(f"| {args.max_batch} | {sizes_batched} | {batched:.1f} | {batched / alone:.2f}x |")
    same = sum(a == b for a, b in zip(texts_alone, texts_batched))
    print(f"identical texts: {same}/{args.requests}")


if __name__ == "__main__":
    main()
