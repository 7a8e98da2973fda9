"""Logging for every genq process: JSON lines in production, readable lines on a terminal.

`configure_logging(settings, service)` installs one stderr handler on the root logger; the API
hands the same dictionary to gunicorn (`logging_config`), so gunicorn's own lines come out in the
same format. Fields passed with `extra=` (`job_id`, `status`, ...) become JSON keys, or
`key=value` pairs after the message in text.

Job transitions are logged by `log_job_transition`, a job hook (`app.hooks`): one line per
created / started / completed, keyed by `job_id`. The hook logs ids, counts and statuses only:
prompts and generated text never reach the log, whatever the level.
"""
from __future__ import annotations

import json
import logging
import logging.config
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from app.settings import Settings

JOB_LOGGER = "genq.jobs"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_NOISY = ("urllib3", "kombu", "amqp", "celery.utils.functional", "filelock", "asyncio")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, service, host, pid, then extras."""

    def __init__(self, service: str = "genq"):
        super().__init__()
        self.static = {"service": service, "host": socket.gethostname()}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
            "pid": record.process,
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, _plain(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`12:00:01.234 INFO  genq.jobs: job completed job_id=... status=succeeded`."""

    converter = time.localtime

    def __init__(self, service: str = "genq"):
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, tail = line.partition("\n")   # keep key=value pairs on the message line
        pairs = " ".join(f"{k}={_plain(v)}" for k, v in extras.items())
        return f"{head} {pairs}{sep}{tail}"


def logging_config(settings: Settings, service: str, level: str | None = None) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary (gunicorn takes it as `logconfig_dict`)."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    level = (level or settings.log_level).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"genq": {"()": f"{__name__}.{formatter.__name__}", "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "genq", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # gunicorn's loggers hand their lines to the root handler instead of their own.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            # Access lines only at DEBUG (HTTP traffic is in the metrics), as with gunicorn's accesslog off.
            "gunicorn.access": {"level": "INFO" if level == "DEBUG" else "WARNING", "handlers": [], "propagate": True},
            **{name: {"level": "WARNING" if level != "DEBUG" else level} for name in _NOISY},
        },
    }


def configure_logging(settings: Settings, service: str, level: str | None = None) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    logging.config.dictConfig(logging_config(settings, service, level))
    logging.captureWarnings(True)


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 6)


_job_log = logging.getLogger(JOB_LOGGER)

_FIELDS = {
    "created": ("priority", "model"),
    "started": ("attempt", "worker_id"),
    "completed": ("status", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "error_type"),
    "released": ("reason",),
}


def log_job_transition(event: str, job_id: str, details: dict[str, Any]) -> None:
    """A job hook: one log line per job transition (token output is not a transition)."""
    level = logging.WARNING if event == "completed" and details.get("status") == "failed" else logging.INFO
    if event not in _FIELDS or not _job_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"event": f"job.{event}", "job_id": job_id}
    fields.update({k: details[k] for k in _FIELDS[event] if details.get(k) is not None})
    if event == "started":
        queue_seconds = _seconds_between(details.get("created_at"), details.get("started_at"))
        if queue_seconds is not None:
            fields["queue_seconds"] = queue_seconds
    _job_log.log(level, "job %s", event, extra=fields)
