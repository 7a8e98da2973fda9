"""Structured outputs on the default model (SmolLM2-135M-Instruct): what constraining costs.

1. Throughput: 32 requests constrained by JSON schemas against the same 32 prompts unconstrained, in
   one run, each request generating exactly --max-tokens tokens (the schemas ask for long arrays,
   which cannot be complete sooner; the free requests ignore EOS), so both runs have the same batch
   shapes and the ratio is the price of the masks alone. Rounds alternate free / constrained; the best
   round of each is compared. Grammars are compiled before the clock starts (the cache is warm).
2. Time to first token of one request on an idle engine: a schema never seen (cold compile), the
   same schema again (cached) and no constraint, on fresh prompts each time.

    python benchmarks/structured.py                   # prints CPU flags and a table, writes JSON
    python benchmarks/structured.py --requests 32 --max-tokens 64 --rounds 2 --ttft-samples 5

The issue's target: constrained throughput >= 0.8x unconstrained.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPICS = ["Paris", "Tokyo", "a bakery", "a football club", "a hospital", "a library", "a bookshop", "a zoo",
          "a school", "a museum", "a startup", "an airline", "a farm", "a cinema", "a hotel", "a gym"]


def _items(item: dict, n: int) -> dict:
    return {"type": "array", "items": {"type": "object", "properties": item, "required": list(item),
                                       "additionalProperties": False}, "minItems": n}


# Each asks for at least 12 objects: none can be complete within 64 tokens.
SCHEMAS = [
    {"type": "object", "properties": {"people": _items({"name": {"type": "string"}, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}, "city": {"type": "string"}}, 12)},
     "required": ["people"], "additionalProperties": False},
    {"type": "object", "properties": {"products": _items({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "price": {"type": "number", "minimum": 0}, "tags": {"type": "array", "items": {
            "enum": ["new", "sale", "eco", "gift"]}, "maxItems": 2}}, 12)},
     "required": ["products"], "additionalProperties": False},
    {"type": "object", "properties": {"events": _items({"date": {"type": "string", "format": "date"},
        "title": {"type": "string", "maxLength": 40}, "attendees": {"type": "integer", "minimum": 1}}, 12)},
     "required": ["events"], "additionalProperties": False},
    {"type": "object", "properties": {"rooms": _items({"number": {"type": "integer"}, "kind": {
        "enum": ["single", "double", "suite"]}, "free": {"type": "boolean"}}, 12)},
     "required": ["rooms"], "additionalProperties": False},
]
ASKS = ["people who work there", "products it sells", "upcoming events", "its rooms"]


def cpu_flags() -> str:
    out = subprocess.run(["grep", "-o", r"avx512_bf16\|amx_bf16\|avx512_vnni", "/proc/cpuinfo"],
                         capture_output=True, text=True).stdout.split()
    return " ".join(sorted(set(out))) or "(none of avx512_bf16, amx_bf16, avx512_vnni)"


def run_batch(llm, prompts, params) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    reasons = sorted({c.finish_reason for o in outs for c in o.outputs})
    return {"seconds": seconds, "output_tokens": tokens, "tok_per_s": tokens / seconds, "finish_reasons": reasons,
            "errors": [o.error for o in outs if o.error]}


class GrammarTimers:
    """Wraps the engine's per-step grammar work with timers: mask filling (+ catching up), mask
    application, token acceptance."""

    def __init__(self, engine):
        from worker.engine import structured

        self.totals = {"fill_s": 0.0, "apply_s": 0.0, "accept_s": 0.0}
        self.steps = 0
        self._restore = []

        def timed(owner, name, key, count_step=False):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.totals[key] += time.perf_counter() - t
                    if count_step:
                        self.steps += 1
            setattr(owner, name, wrapper)
            self._restore.append((owner, name, original))

        timed(engine.structured, "masks", "fill_s", count_step=True)
        timed(structured.GrammarMasks, "apply", "apply_s")
        timed(structured.GrammarState, "accept", "accept_s")

    def close(self) -> dict:
        for owner, name, original in reversed(self._restore):
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        return {**self.totals, "steps": self.steps}


def first_token_seconds(engine, request_id, prompt, params, compiled_at=None) -> float:
    """Seconds from add_request to the first token; `compiled_at` (a list) gets the seconds until the
    request's grammar was ready, when it has one."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    future = engine.requests[request_id].grammar
    if compiled_at is not None and future is not None:
        future.add_done_callback(lambda _: compiled_at.append(time.perf_counter() - start))
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.request_id == request_id and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            if out.finished and out.error:
                raise RuntimeError(out.error)
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft-samples", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    args = ap.parse_args()
    import torch

    from worker.engine import LLM, SamplingParams

    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    llm = LLM()
    engine = llm.engine
    chat = engine.apply_chat_template
    n = args.requests
    prompts = [chat([{"role": "user", "content": f"As JSON, list {ASKS[i % 4]} of {TOPICS[i % len(TOPICS)]}."}])
               for i in range(n)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = [SamplingParams(temperature=0, max_tokens=args.max_tokens, json=SCHEMAS[i % 4]) for i in range(n)]

    t = time.perf_counter()
    for schema in SCHEMAS:                      # warm: the first compile also prepares the tokenizer
        engine.structured.compile("json", schema).result()
    warm_compile_s = time.perf_counter() - t
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)   # warm the model

    rounds = []
    for r in range(args.rounds):
        f = run_batch(llm, prompts, free)
        timers = GrammarTimers(engine)
        c = run_batch(llm, prompts, constrained)
        c["grammar"] = timers.close()
        rounds.append({"free": f, "constrained": c, "ratio": c["tok_per_s"] / f["tok_per_s"]})
        print(f"round {r + 1}: free {f['tok_per_s']:.1f} tok/s ({f['output_tokens']} tokens, {f['seconds']:.1f} s), "
              f"constrained {c['tok_per_s']:.1f} tok/s ({c['output_tokens']} tokens, {c['seconds']:.1f} s, "
              f"finish {c['finish_reasons']}), ratio {rounds[-1]['ratio']:.3f}")
        if c["errors"]:
            print("  errors:", c["errors"][:3])
    best_free = max(x["free"]["tok_per_s"] for x in rounds)
    best_con = max(x["constrained"]["tok_per_s"] for x in rounds)
    g = rounds[-1]["constrained"]["grammar"]
    per_step = {k: g[k] / max(g["steps"], 1) * 1e3 for k in ("fill_s", "apply_s", "accept_s")}
    step_ms = rounds[-1]["constrained"]["seconds"] / max(g["steps"], 1) * 1e3

    # TTFT: cold compile vs cached vs free, fresh prompts each time (the chat template's prefix is cached alike)
    cold, cached, none, compiled = [], [], [], []
    for i in range(args.ttft_samples):
        schema = {"type": "object", "properties": {f"field_{i}_{k}": {"type": "string"} for k in range(3)},
                  "required": [f"field_{i}_0"], "additionalProperties": False}
        topic = [TOPICS[(i + j) % len(TOPICS)] for j in range(3)]
        asks = [chat([{"role": "user", "content": f"Request {i}-{j}: describe {topic[j]} as JSON."}]) for j in range(3)]
        one = SamplingParams(temperature=0, max_tokens=1, json=schema)
        cold.append(first_token_seconds(engine, f"cold{i}", asks[0], one, compiled))
        cached.append(first_token_seconds(engine, f"cached{i}", asks[1], one))
        none.append(first_token_seconds(engine, f"free{i}", asks[2], SamplingParams(temperature=0, max_tokens=1)))
    ttft = {"cold_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(cached) * 1e3,
            "free_ms": statistics.median(none) * 1e3, "cold_grammar_ready_ms": statistics.median(compiled) * 1e3}

    print(f"\n{n} requests x {args.max_tokens} tokens, greedy, default model, best of {args.rounds} rounds:")
    print(f"  unconstrained  {best_free:7.1f} output tok/s")
    print(f"  constrained    {best_con:7.1f} output tok/s   ratio {best_con / best_free:.3f} (target >= 0.8)")
    print(f"  grammar work per constrained step (last round, {g['steps']} steps of {step_ms:.1f} ms): "
          f"fill {per_step['fill_s']:.2f} ms, apply {per_step['apply_s']:.2f} ms, accept {per_step['accept_s']:.2f} ms")
    print(f"  first compiles (tokenizer preparation + 4 schemas): {warm_compile_s * 1e3:.0f} ms")
    print(f"TTFT on an idle engine, median of {args.ttft_samples}: cold schema {ttft['cold_ms']:.1f} ms, "
          f"cached schema {ttft['cached_ms']:.1f} ms, unconstrained {ttft['free_ms']:.1f} ms; "
          f"a cold compile adds {ttft['cold_ms'] - ttft['cached_ms']:.1f} ms (its grammar was ready "
          f"{ttft['cold_grammar_ready_ms']:.1f} ms after add_request)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "requests": n,
                               "max_tokens": args.max_tokens, "rounds": rounds, "best_free_tok_per_s": best_free,
                               "best_constrained_tok_per_s": best_con, "ratio": best_con / best_free,
                               "grammar_ms_per_step": per_step, "first_compiles_ms": warm_compile_s * 1e3,
                               "ttft": ttft, "ttft_samples_s": {"cold": cold, "cached": cached, "free": none}},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
