"""Serve the API with gunicorn (threaded workers: SSE streams and `Prefer: wait` hold a thread)."""
from __future__ import annotations

from gunicorn.app.base import BaseApplication

from app.api import create_app
from app.api.warm import start_warming
from app.infra.logs import logging_config
from app.infra.settings import Settings


class GunicornServer(BaseApplication):
    def __init__(self, settings: Settings, **options):
        self.settings = settings
        self.options = {
            "bind": f"{settings.api_host}:{settings.api_port}",
            "workers": settings.api_workers,
            "threads": settings.api_threads,
            "worker_class": "gthread",
            "timeout": 120,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "logconfig_dict": logging_config(settings, "api"),   # gunicorn's lines in genq's format
            "control_socket_disable": True,   # several servers on one machine would share its path
            **options,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self):
        app = create_app(self.settings)   # in each worker process, after the fork
        start_warming(app)                # so that its first request is no slower than its second
        return app


def serve(settings: Settings, **options) -> None:
    GunicornServer(settings, **options).run()
