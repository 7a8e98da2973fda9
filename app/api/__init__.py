"""The Flask application: `create_app()` wires settings, connections, blueprints and errors."""
from __future__ import annotations

from flask import Flask

from app.api import admission, auth, batches, boundary, files, health, jobs, openai, workers
from app.api import webhooks as webhooks_api
from app.api.metrics import Metrics
from app.api.problems import register_error_handlers
from app.api.services import genq, services
from app.infra.broker import send_run_job
from app.infra.settings import Settings
from app.jobs import transitions
from app.jobs.transitions import log_job_transition
from app.openai.batches import advance_on_completion
from app.webhooks.dispatcher import dispatcher_for

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
    transitions.register(log_job_transition)   # one log line per job transition (idempotent)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(workers.bp)

    app.register_blueprint(openai.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(batches.bp)

    connections = app.extensions[genq.name]
    # a batch line canceled while queued releases the next line (and may finalize its batch)
    transitions.register(advance_on_completion(
        connections.sessions, settings.batch_max_in_flight,
        lambda job_id, priority: send_run_job(connections.celery, settings, job_id, priority)))

    app.register_blueprint(webhooks_api.bp)
    transitions.register(dispatcher_for(settings, connections.sessions, connections.celery))
    return app
