"""The Flask application: `create_app()` wires settings, connections, blueprints and errors."""
from __future__ import annotations

from flask import Flask

from app import reactions
from app.api import admission, auth, batches, boundary, console, files, health, jobs, openai, usage, webhooks, workers
from app.api.metrics import Metrics
from app.api.problems import register_error_handlers
from app.api.services import genq, services
from app.infra.settings import Settings

MAX_BODY_BYTES = 8 * 1024 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("genq")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.json.compact = True
    genq.init_app(app, settings)
    metrics = Metrics()
    metrics.init_app(app, services)
    app.extensions["genq_metrics"] = metrics
    register_error_handlers(app)
    auth.install(app)                    # every /v1 request needs an API key (app/api/auth.py)
    admission.install(app)               # quotas, load shedding, idempotency keys of submissions
    boundary.install(app)                # /openapi.json; ids that cannot be job ids are 404
    for blueprint in (health.bp, jobs.bp, webhooks.bp, workers.bp, usage.bp, openai.bp, files.bp, batches.bp):
        app.register_blueprint(blueprint)
    console.init_app(app)                # the web console under /ui, signed in by cookie (docs/console.md)
    connections = app.extensions[genq.name]
    # the log line, webhook events, and (a batch line canceled while queued) batch progress
    reactions.install(settings, connections.sessions, connections.celery)
    return app
