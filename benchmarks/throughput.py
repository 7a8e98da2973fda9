"""Offline throughput: genq against transformers on the same synthetic workload, in one run.

Baselines: transformers one request at a time, and transformers static batches (left padding,
the batch runs until its longest request is done; only each request's own tokens count). genq gets
every request at once. Output lengths are forced (ignore_eos + min_tokens) so all runs do the same
work. Also measures this machine's matmul rate and prints each run's fraction of the compute bound
(2 x parameters FLOPs per processed token). Prints a table and writes JSON.

    python benchmarks/throughput.py                      # default model, fp32 and bf16 genq
    python benchmarks/throughput.py --workload decode    # outputs of 128-512 tokens
    python benchmarks/throughput.py --model /path/to/hf_dir --tp 2
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = {"default": ((16, 512), (8, 128)), "decode": ((16, 512), (128, 512))}


def make_workload(n: int, prompt_range, output_range, vocab: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
            for _ in range(n)]


def matmul_flops(dtype, seconds: float = 2.0) -> float:
    import torch
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def run_genq(model, workload, dtype: str, tp: int) -> dict:
    from worker.engine import LLM, SamplingParams
    llm = LLM(model=model, dtype=dtype, tensor_parallel_size=tp) if tp > 1 else LLM(model=model, dtype=dtype)
    llm.generate([[11, 12, 13]], SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up
    prompts = [p for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True) for _, n in workload]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == [n for _, n in workload]
    stats = llm.engine.stats()
    result = {"seconds": elapsed, "max_batch_size": stats.max_batch_size, "steps": stats.steps}
    if llm.engine.tp is None:
        result["params"] = sum(p.numel() for p in llm.engine.model.parameters())
    else:   # rank 0 holds a shard: count the whole model, and report what each rank holds
        result["params"] = llm.engine.tp.sharder.whole_param_count
        result["rank_param_bytes"] = [r["param_bytes"] for r in llm.engine.tp.rank_stats()]
        print(f"  per-rank parameter bytes: {result['rank_param_bytes']}", flush=True)
    llm.engine.shutdown()
    del llm
    return result


def run_hf(model_dir, workload, batch_size: int, limit: int | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = workload[:limit] if limit else workload
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
            new = max(n for _, n in chunk)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    return {"seconds": time.perf_counter() - start, "requests": len(items),
            "prompt_tokens": sum(len(p) for p, _ in items), "output_tokens": sum(n for _, n in items)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--single-limit", type=int, default=8,
                    help="requests timed for the one-at-a-time baseline (it is slow); 0 skips it")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size for genq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args(argv)

    import torch
    from worker.engine.loader import hf_dir_for, resolve_model
    model_path = resolve_model(args.model)
    hf_dir = hf_dir_for(model_path)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    prompt_range, output_range = WORKLOADS[args.workload]
    workload = make_workload(args.requests, prompt_range, output_range, vocab, args.seed)
    prompt_tokens = sum(len(p) for p, _ in workload)
    output_tokens = sum(n for _, n in workload)
    print(f"model {model_path.name}, {args.requests} requests, {prompt_tokens} prompt + {output_tokens} output "
          f"tokens, torch threads {torch.get_num_threads()}", flush=True)

    rows = []
    flops = {"float32": matmul_flops(torch.float32)}
    if "bfloat16" in args.dtypes:
        flops["bfloat16"] = matmul_flops(torch.bfloat16)
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in flops.items()), flush=True)
    n_params = None
    for dtype in args.dtypes.split(","):
        r = run_genq(str(model_path), workload, dtype, args.tp)
        n_params = r["params"]
        rows.append({"run": f"genq {dtype}" + (f" tp={args.tp}" if args.tp > 1 else ""), "dtype": dtype,
                     "requests": args.requests, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                     "seconds": r["seconds"], "max_batch_size": r["max_batch_size"],
                     **({"rank_param_bytes": r["rank_param_bytes"]} if "rank_param_bytes" in r else {})})
        print(f"  {rows[-1]['run']}: {r['seconds']:.1f}s", flush=True)
    if not args.no_hf:
        if args.single_limit:
            r = run_hf(hf_dir, workload, 1, args.single_limit)
            rows.append({"run": "transformers one at a time", "dtype": "float32", **r})
            print(f"  {rows[-1]['run']}: {r['seconds']:.1f}s", flush=True)
        r = run_hf(hf_dir, workload, args.static_batch)
        rows.append({"run": f"transformers static batch {args.static_batch}", "dtype": "float32", **r})
        print(f"  {rows[-1]['run']}: {r['seconds']:.1f}s", flush=True)

    for row in rows:
        row.setdefault("requests", args.requests)
        row["output_tok_s"] = row["output_tokens"] / row["seconds"]
        total = row["prompt_tokens"] + row["output_tokens"]
        row["compute_bound_fraction"] = 2 * n_params * total / row["seconds"] / flops.get(row["dtype"], flops["float32"])
    base = {r["run"]: r["output_tok_s"] for r in rows if r["run"].startswith("transformers")}
    header = f"{'run':34} {'reqs':>5} {'prompt':>7} {'output':>7} {'sec':>8} {'out tok/s':>10} {'%bound':>7}"
    header += "".join(f" {'x ' + k.split()[-1] if 'static' not in k else 'x static':>10}" for k in base)
    print(header)
    for row in rows:
        line = (f"{row['run']:34} {row['requests']:>5} {row['prompt_tokens']:>7} {row['output_tokens']:>7} "
                f"{row['seconds']:>8.1f} {row['output_tok_s']:>10.1f} {100 * row['compute_bound_fraction']:>6.1f}%")
        for k, v in base.items():
            row[f"ratio_vs_{k}"] = row["output_tok_s"] / v
            line += f" {row['output_tok_s'] / v:>10.2f}"
        print(line)
    genq = {r["dtype"]: r["output_tok_s"] for r in rows if r["run"].startswith("genq")}
    if "float32" in genq and "bfloat16" in genq:
        print(f"genq bfloat16 / float32: {genq['bfloat16'] / genq['float32']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_path), "workload": args.workload, "matmul_flops": flops,
                               "params": n_params, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
