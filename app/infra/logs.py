"""Logging for every genq process: JSON lines in production, readable lines on a terminal.

`configure_logging(settings, service)` installs one stderr handler on the root logger; the API
hands the same dictionary to gunicorn (`logging_config`), so gunicorn's own lines come out in the
same format. Fields passed with `extra=` (`job_id`, `status`, ...) become JSON keys, or
`key=value` pairs after the message in text.
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

from app.infra.settings import Settings

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
    os.environ.setdefault("PYTHONUNBUFFERED", "1")   # noqa: TID251 -- a Python variable, not a genq setting
    logging.config.dictConfig(logging_config(settings, service, level))
    logging.captureWarnings(True)
