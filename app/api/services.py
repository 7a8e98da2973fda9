"""The API's connections (database sessions, Redis, the Celery producer, the job event log),
opened unbound and attached to an app in `create_app` (the Flask extension pattern)."""
from __future__ import annotations

from flask import Flask, current_app

from app.infra.settings import Settings
from app.jobs.connections import Connections


class GenqExtension:
    name = "genq"

    def init_app(self, app: Flask, settings: Settings) -> None:
        app.extensions[self.name] = Connections.open(settings)


genq = GenqExtension()


def services() -> Connections:
    return current_app.extensions[GenqExtension.name]
