"""Shared steps in the engine alone (no API, no queue): what one light request pays beside a flood,
and what the flood pays for it, with `fair_step_share` off and on, in one run.

For each setting a fresh engine (one torch thread, fair scheduling) is warmed up as a worker warms
it, then:
- B alone: one request (a `--light-prompt`-token prompt, `--light-tokens` tokens out);
- the flood: tenant A's `--flood` requests (prompts 64-256 tokens, 32-64 out), `--rows` of them in
  the engine at a time (as a worker's task threads hold them; the engine keeps 2 slots more, the
  newcomer reserve), stepped until it runs steadily (A's tokens/s over `--steady` steps: the
  flood's rate without B);
- B again, added to the running flood: its time and decode steps, and A's tokens/s while B ran.

The ratios to read: B's time under the flood / B alone (the light tenant's slowdown; shared steps
aim at <= 2) and A's tokens/s while B ran / without B (what the flood pays). Greedy, ignore_eos.
Not part of `make test`; docs/fairness.md has the figures.

    python benchmarks/shared_steps.py                  # the default model (~3 min on 2 cores)
    python benchmarks/shared_steps.py --model tiny     # a tiny random Llama (seconds)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpu_info  # noqa: E402  (benchmarks/)
import torch  # noqa: E402

from worker.engine import LLMEngine, SamplingParams  # noqa: E402
from worker.runtime import warm_up  # noqa: E402


def run(args, share: bool) -> dict:
    model = None if args.model == "default" else args.model
    if args.model == "tiny":
        from worker.engine.tiny import build_tiny_model   # a random tiny Llama, built in-process
        model = build_tiny_model(Path(tempfile.mkdtemp(prefix="genq-shared-steps-")) / "tiny-llama")
    # the worker's engine: its task threads' rows and the newcomer reserve's 2 beyond them
    engine = LLMEngine(model=model, dtype=args.dtype, max_num_seqs=args.rows + 2,
                       max_num_batched_tokens=args.budget, scheduling="fair", fair_step_share=share)
    warm_up(engine)
    rng = random.Random(0)
    vocab = min(engine.model.args.vocab_size, 40000)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    steps: list[list] = []      # [tokens, B's tokens, seconds]

    def hook(batch) -> None:
        steps.append([batch.num_batched_tokens,
                      sum(i.num_new_tokens for i in batch.scheduled if i.seq.request.tenant == "B"), 0.0])
    engine.step_hook = hook

    light = SamplingParams(max_tokens=args.light_tokens, ignore_eos=True, temperature=0)

    def light_request(rid: str) -> float:   # a fresh prompt each time: none of it in the prefix cache
        started = time.perf_counter()
        engine.add_request(rid, prompt(args.light_prompt), light, tenant="B")
        while rid in engine.requests:
            step()
        return time.perf_counter() - started

    flood = [(f"a{i}", prompt(rng.randint(64, 256)),
              SamplingParams(max_tokens=rng.randint(32, 64), ignore_eos=True, temperature=0))
             for i in range(args.flood)]

    flooding = False

    def step() -> None:   # the flood keeps `--rows` requests in the engine, as a worker's task threads do
        while flooding and flood and sum(rid.startswith("a") for rid in engine.requests) < args.rows:
            rid, tokens, params = flood.pop(0)
            engine.add_request(rid, tokens, params, tenant="A")
        before = len(steps)
        started = time.perf_counter()
        engine.step()
        if len(steps) > before:
            steps[-1][2] = time.perf_counter() - started

    alone = light_request("b-alone")
    alone_steps = [s for n, b, s in steps if n == b == 1]
    flooding = True
    for _ in range(args.settle):
        step()
    steps.clear()
    for _ in range(args.steady):
        step()
    flood_rate = sum(n for n, _, _ in steps) / sum(s for _, _, s in steps)
    steps.clear()
    shared = light_request("b-shared")
    b_steps = [(n, s) for n, b, s in steps if b == 1]
    a_rate = sum(n - b for n, b, _ in steps) / sum(s for _, _, s in steps)
    shared_count = engine.stats().shared_steps
    engine.shutdown()
    return {
        "fair_step_share": share,
        "b_alone_seconds": alone, "b_alone_step_ms": 1000 * statistics.median(alone_steps),
        "b_flood_seconds": shared, "b_flood_step_ms": 1000 * statistics.median(s for _, s in b_steps),
        "b_flood_step_tokens": statistics.median(n for n, _ in b_steps),
        "flood_tokens_per_second": flood_rate, "flood_beside_b_tokens_per_second": a_rate,
        "b_slowdown": shared / alone, "flood_kept": a_rate / flood_rate, "shared_steps": shared_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M), 'tiny', or a path")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker of the fairness benchmark: 1)")
    parser.add_argument("--flood", type=int, default=60)
    parser.add_argument("--rows", type=int, default=16, help="max_num_seqs of the flood")
    parser.add_argument("--budget", type=int, default=256, help="max_num_batched_tokens")
    parser.add_argument("--settle", type=int, default=30, help="flood steps before measuring")
    parser.add_argument("--steady", type=int, default=30, help="flood steps measured without B")
    parser.add_argument("--light-prompt", type=int, default=100)
    parser.add_argument("--light-tokens", type=int, default=40)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_info.describe()}; torch threads {args.threads}; model {args.model} ({args.dtype})", flush=True)
    results = [run(args, share) for share in (False, True)]
    print(f"{'fair_step_share':>15} {'B alone':>8} {'B flood':>8} {'slowdown':>8} {'B step':>15} "
          f"{'flood tok/s':>11} {'beside B':>8} {'kept':>5}")
    for r in results:
        print(f"{'on' if r['fair_step_share'] else 'off':>15} {r['b_alone_seconds']:7.2f}s "
              f"{r['b_flood_seconds']:7.2f}s {r['b_slowdown']:7.2f}x "
              f"{r['b_flood_step_ms']:6.1f} ms/{r['b_alone_step_ms']:4.1f} {r['flood_tokens_per_second']:11.1f} "
              f"{r['flood_beside_b_tokens_per_second']:8.1f} {r['flood_kept']:5.2f}")
    print("(B step: B's decode step under the flood, median, / B's decode step alone; tokens/s: every token "
          "the flood's steps computed, prompt and output)")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_info.describe(), "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
