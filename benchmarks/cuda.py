"""The engine on one CUDA GPU: correctness against transformers, then throughput, in one short run.

Sized to fit a short lease on a lent GPU (a few minutes). Three parts, each written to the JSON as
soon as it ends, so a run cut short keeps what it measured:

1. correctness: tiny random Llamas (GQA, MHA, MQA; the suite's shapes), genq on CUDA against
   transformers on CUDA, float32, greedy, token for token (TF32 off on both), under the default
   regime, chunked prefill, preemption and a second pass through the prefix cache; then bfloat16
   genq against its own float32 tokens (agreement, as on the CPU).
2. throughput: a random Llama with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads, vocab
   49,152; random weights: nothing is downloaded), the same synthetic workload for genq (every
   request at once; Triton kernels, and again with the PyTorch reference kernels) and for
   transformers' static batches, in one process; output lengths forced so every run does the same work.
3. kernels: benchmarks/kernels.py in a subprocess (each Triton kernel checked against PyTorch, then
   timed against the device's copy bandwidth); run it alone for the full table.

    python benchmarks/cuda.py [--out benchmarks/results/cuda.json] [--requests 256] [--skip-kernels]

On a machine without CUDA it says so and exits 0 (CPU runs: --device cpu, for trying the script).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
SMOLLM2_VOCAB = 49152
TINY_CONFIGS = {   # as tests/engine/conftest.py
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       rope_theta=500000.0, seed=1),
    "mqa-3layer": dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3,
                       rope_theta=1000000.0, seed=2, hidden_size=96, intermediate_size=160),
}
REGIMES = {
    "default": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=48, block_size=8),
}


class Report:
    def __init__(self, path: Path):
        self.path, self.data = path, {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2))


def log(*args):
    print(*args, flush=True)


def prompts_for(n, seed, vocab, lo=1, hi=60, shared_prefix=35):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    out = []
    for i in range(n):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
        out.append(prefix + tail if i % 2 else tail)
    return out


def hf_greedy(model_dir, prompts, max_new, device):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
            outs.append(o[0, len(p):].tolist())
    del model
    return outs


def release(device) -> int:
    """Collect what a shut-down engine left and say how many device bytes are still allocated."""
    import gc

    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()
    return 0


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def correctness(device, tmp: Path) -> dict:
    from worker.engine import LLM, SamplingParams
    from worker.engine.tiny import build_tiny_model

    max_new = 24
    greedy = SamplingParams(temperature=0, max_tokens=max_new)
    result = {}
    for name, cfg in TINY_CONFIGS.items():
        model_dir = build_tiny_model(tmp / name, **cfg)
        prompts = prompts_for(16, seed=len(name), vocab=320)
        prompts.append(prompts_for(1, seed=99, vocab=320, lo=300, hi=300)[0])   # many blocks, long decode context
        expected = hf_greedy(model_dir, prompts, max_new, device)
        for regime, kwargs in REGIMES.items():
            if not (name == "gqa-tied" and regime == "default"):   # that one sizes its cache from free memory
                kwargs = {"num_kv_blocks": 2048, **kwargs}
            llm = LLM(model=str(model_dir), device=device, **kwargs)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            row = {"equal": sum(g == e for g, e in zip(got, expected)), "of": len(prompts),
                   "first_differences": [first_difference(g, e) for g, e in zip(got, expected) if g != e]}
            stats = llm.engine.stats()
            row["preemptions"], row["max_batch_size"] = stats.preemptions, stats.max_batch_size
            row["kv_blocks_total"] = stats.kv_blocks_total
            if regime == "default":
                again = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
                row["second_pass_equal"] = sum(g == e for g, e in zip(again, expected))
                row["prefix_cache_hits"] = llm.engine.stats().prefix_cache_hits
                row["kv_blocks_leaked"] = llm.engine.stats().kv_blocks_used
            llm.engine.shutdown()
            del llm
            row["device_bytes_after_shutdown"] = release(device)
            result[f"{name}/{regime}"] = row
            log(f"  {name:11s} {regime:16s} float32 greedy equal to transformers: {row['equal']}/{row['of']}"
                + (f"  second pass {row['second_pass_equal']}/{row['of']}, prefix hits {row['prefix_cache_hits']}"
                   if regime == "default" else "") + (f"  preemptions {row['preemptions']}" if row["preemptions"] else "")
                + f"  kv blocks {row['kv_blocks_total']}, device bytes left after shutdown {row['device_bytes_after_shutdown']}")
        llm = LLM(model=str(model_dir), device=device, dtype="bfloat16", num_kv_blocks=2048)
        got16 = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        llm.engine.shutdown()
        agree = sum(g == e for g, e in zip(got16, expected))
        result[f"{name}/bfloat16-vs-float32"] = {"equal": agree, "of": len(prompts)}
        log(f"  {name:11s} bfloat16 greedy equal to float32 transformers: {agree}/{len(prompts)}")
    return result


def build_smollm2_shaped(path: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from worker.engine.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=SMOLLM2_VOCAB, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SMOLLM2_SHAPES)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def throughput(device, dtype, tmp: Path, n_requests: int, static_batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from worker.engine import LLM, SamplingParams

    model_dir = build_smollm2_shaped(tmp / "smollm2-shaped")
    rng = random.Random(0)
    workload = [([rng.randrange(10, SMOLLM2_VOCAB) for _ in range(rng.randint(64, 512))], rng.randint(64, 256))
                for _ in range(n_requests)]
    prompt_tokens, output_tokens = sum(len(p) for p, _ in workload), sum(n for _, n in workload)
    result = {"requests": n_requests, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
              "dtype": dtype, "static_batch": static_batch}
    log(f"  workload: {n_requests} requests, {prompt_tokens} prompt + {output_tokens} output tokens, {dtype}")
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True) for _, n in workload]

    for label, kwargs in (("genq", {}), ("genq-torch-kernels", {"kernel_impl": "torch"})):
        llm = LLM(model=str(model_dir), device=device, dtype=dtype, num_kv_blocks=16384, max_num_seqs=256,
                  max_num_batched_tokens=8192, **kwargs)
        llm.generate([[11, 12, 13]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
        torch.cuda.synchronize() if device.startswith("cuda") else None
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in workload], params, use_tqdm=False)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        seconds = time.perf_counter() - start
        assert [len(o.outputs[0].token_ids) for o in outs] == [n for _, n in workload]
        stats = llm.engine.stats()
        result[label] = {"seconds": seconds, "output_tok_s": output_tokens / seconds,
                         "total_tok_s": (prompt_tokens + output_tokens) / seconds,
                         "steps": stats.steps, "max_batch_size": stats.max_batch_size}
        log(f"  {label:20s} {seconds:7.2f} s  {output_tokens / seconds:9.0f} output tok/s  "
            f"steps {stats.steps}, max batch {stats.max_batch_size}")
        llm.engine.shutdown()
        del llm
        release(device)

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(workload), static_batch):
            chunk = workload[i:i + static_batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            new = max(n for _, n in chunk)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    torch.cuda.synchronize() if device.startswith("cuda") else None
    seconds = time.perf_counter() - start
    result["transformers-static"] = {"seconds": seconds, "output_tok_s": output_tokens / seconds}
    log(f"  {'transformers static':20s} {seconds:7.2f} s  {output_tokens / seconds:9.0f} output tok/s  "
        f"(batches of {static_batch}, left padded; only each request's own tokens counted)")
    result["genq_speedup_vs_transformers_static"] = seconds / result["genq"]["seconds"]
    result["triton_speedup_vs_torch_kernels"] = result["genq-torch-kernels"]["seconds"] / result["genq"]["seconds"]
    log(f"  genq / transformers static: {result['genq_speedup_vs_transformers_static']:.2f}x; "
        f"Triton kernels / PyTorch kernels: {result['triton_speedup_vs_torch_kernels']:.2f}x")
    return result


def profile(device, dtype, tmp: Path, out_txt: Path, n_requests: int = 128) -> dict:
    """cProfile over genq's generate of a decode-heavy workload: where the host's time goes per step."""
    import cProfile
    import io
    import pstats

    import torch
    from worker.engine import LLM, SamplingParams

    model_dir = tmp / "smollm2-shaped"
    if not model_dir.exists():
        build_smollm2_shaped(model_dir)
    rng = random.Random(1)
    prompts = [[rng.randrange(10, SMOLLM2_VOCAB) for _ in range(256)] for _ in range(n_requests)]
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64, ignore_eos=True)
    llm = LLM(model=str(model_dir), device=device, dtype=dtype, num_kv_blocks=16384, max_num_seqs=256,
              max_num_batched_tokens=8192)
    llm.generate([[11, 12, 13]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
    steps0 = llm.engine.stats().steps
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    seconds = time.perf_counter() - start
    steps = llm.engine.stats().steps - steps0
    llm.engine.shutdown()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    out_txt.write_text(buf.getvalue())
    log(f"  {n_requests} requests x (256 prompt + 64 output), under cProfile: {seconds:.2f} s, {steps} steps, "
        f"{1000 * seconds / steps:.1f} ms/step; top of the profile in {out_txt}")
    log("\n".join(buf.getvalue().splitlines()[:45]))
    return {"seconds": seconds, "steps": steps, "ms_per_step": 1000 * seconds / steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/cuda.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--static-batch", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also cProfile the engine's host side")
    ap.add_argument("--kernel-reps", type=int, default=50)
    args = ap.parse_args(argv)

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run on a machine with a GPU)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = Report(Path(args.out))
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    import transformers
    env["transformers"] = transformers.__version__
    report.put("environment", env)
    log("environment:", json.dumps(env))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_correctness:
            log("1. correctness (genq on %s against transformers on %s)" % (args.device, args.device))
            t0 = time.perf_counter()
            report.put("correctness", correctness(args.device, tmp))
            log(f"   ({time.perf_counter() - t0:.0f} s)")
        if not args.skip_throughput:
            log("2. throughput (SmolLM2-135M shapes, random weights)")
            t0 = time.perf_counter()
            report.put("throughput", throughput(args.device, args.dtype, tmp, args.requests, args.static_batch))
            log(f"   ({time.perf_counter() - t0:.0f} s)")
        if args.profile:
            log("2b. host-side profile of the engine")
            report.put("profile", profile(args.device, args.dtype, tmp, Path(args.out).with_name("profile.txt")))
    if not args.skip_kernels and args.device.startswith("cuda"):
        log("3. kernels (benchmarks/kernels.py)")
        kernels_json = Path(args.out).with_name("kernels.json")
        env_vars = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        rc = subprocess.call([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--reps", str(args.kernel_reps),
                              "--json", str(kernels_json)], env=env_vars)
        report.put("kernels_rc", rc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
