"""The web console's pages under /ui (docs/console.md): sign-in, overview, jobs, a job (live), submit,
batches. Server-rendered Jinja (auto-escaped) plus small scripts in static/console/.

Every view but sign-in needs a console session (app/api/console/sessions.py); the session's key is
put where `app.api.auth` keeps the request's key, so `current_owner()` scopes every lookup exactly as
on the JSON API, and the same domain functions run (submit, cancel, follow, the stores).
"""
from __future__ import annotations

import io
import json
import secrets
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

from flask import (Blueprint, Response, current_app, g, jsonify, make_response, redirect, render_template, request,
                   send_file, url_for)
from pydantic import ValidationError

from app.api.admission import admission, refused
from app.api.auth import charge_request, current_key, current_owner
from app.api.console import forms
from app.api.console.guard import CSRF_FIELD, add_security_headers, check_csrf
from app.api.console.sessions import SessionStore, live_key
from app.api.job_request import JobCreate
from app.api.jobs import find_job
from app.api.problems import validation_problem
from app.api.request_parsing import decode_cursor, encode_cursor, last_event_id
from app.api.services import services
from app.api.sse import sse_stream
from app.api.webhooks import check_submission as check_webhook
from app.api.webhooks import register as register_webhook
from app.api.webhooks import webhooks_body
from app.infra.broker import queue_depth
from app.infra.ids import well_formed_id
from app.infra.problems import Problem
from app.infra.worker_reports import live_workers
from app.jobs import figures, store
from app.jobs.cancel import cancel
from app.jobs.models import ALL_STATUSES, Job, JobStatus
from app.jobs.serialization import job_to_dict
from app.jobs.store import CancelOutcome, SubmissionRefused
from app.jobs.submit import Submission, UnknownModel, served_model, submit
from app.openai import batches as batch_store
from app.openai import files as file_store
from app.tenancy import keys

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
               static_url_path="/static")

SESSION_COOKIE = "genq_console"
SIGN_IN_COOKIE = "genq_console_signin"    # the sign-in form's double-submitted CSRF token
PAGE_SIZE = 25
SSE_RETRY_MS = 1000                       # how soon a browser reconnects a dropped job stream
OPEN_ENDPOINTS = {"console.sign_in", "console.static"}
# Pages a signed-out visitor is sent to sign in from (and back to); anything else (data, streams,
# forms) is a 401.
PAGES = {"console.overview", "console.jobs", "console.job", "console.submit_job", "console.batches",
         "console.download_file"}


def init_app(app) -> None:
    svc = app.extensions["genq"]
    app.extensions["genq_console_sessions"] = SessionStore(svc.redis, svc.channels)
    app.register_blueprint(bp)


def _sessions() -> SessionStore:
    return current_app.extensions["genq_console_sessions"]


# -- the session on every request --------------------------------------------------------------------

@bp.before_request
def _signed_in():
    g.console = None
    if request.endpoint == "console.static":
        return None
    token = request.cookies.get(SESSION_COOKIE)
    session = _sessions().get(token)
    if session is not None:
        with services().sessions() as db:
            key = live_key(db, session.key_id)
        if key is None:        # revoked since: the session ends with it
            _sessions().delete(token)
        else:
            g.console, g.genq_key = session, key
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if g.console is None:
        if request.method == "GET" and request.endpoint in PAGES:
            return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")), 303)
        raise Problem(401, "sign in to the console first", title="Not signed in", type="unauthorized")
    if request.method == "POST":
        check_csrf(g.console.csrf_token)
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    return add_security_headers(response)


@bp.errorhandler(Problem)
def _problem_page(exc: Problem):
    response = make_response(render_template("console/error.html", problem=exc), exc.status)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


@bp.app_template_global("console_csrf_token")
def _csrf_token() -> str:
    return g.console.csrf_token if g.get("console") else ""


@bp.app_template_filter("when")
def _when(value: datetime | str | None) -> str:
    """A time as the console shows it everywhere (console.js formats the same way)."""
    if not value:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("seconds")
def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s"


@bp.app_template_filter("as_text")
def _as_text(value) -> str:
    """A value shown as text: strings as they are, anything else as indented JSON (auto-escaped
    by the template like any other text)."""
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


# -- signing in and out ---------------------------------------------------------------------------

@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    next_page = _local_page(request.values.get("next"))
    if request.method == "GET":
        if g.console is not None:
            return redirect(next_page, 303)
        return _sign_in_page(next_page)
    check_csrf(request.cookies.get(SIGN_IN_COOKIE))
    plaintext = request.form.get("api_key", "").strip()
    with services().sessions() as db:
        key = keys.authenticate(db, plaintext) if plaintext else None
    if key is None:
        return _sign_in_page(next_page, error="That API key is unknown or revoked.", status=401)
    _sessions().delete(request.cookies.get(SESSION_COOKIE))   # a new session id at each sign-in
    token, _ = _sessions().create(key.id)
    response = redirect(next_page, 303)
    response.set_cookie(SESSION_COOKIE, token, max_age=_sessions().ttl_seconds, path=bp.url_prefix,
                        secure=request.is_secure, httponly=True, samesite="Strict")
    response.delete_cookie(SIGN_IN_COOKIE, path=bp.url_prefix)
    return response


def _sign_in_page(next_page: str, error: str | None = None, status: int = 200):
    token = request.cookies.get(SIGN_IN_COOKIE)
    if not token or len(token) > 64:
        token = secrets.token_urlsafe(32)
    response = make_response(render_template("console/sign_in.html", next_page=next_page, error=error,
                                             sign_in_token=token), status)
    response.set_cookie(SIGN_IN_COOKIE, token, path=bp.url_prefix, secure=request.is_secure, httponly=True,
                        samesite="Strict")
    return response


def _local_page(target: str | None) -> str:
    """Where to go after signing in: a console path of this site, nothing else (no open redirect)."""
    default = url_for("console.overview")
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith(bp.url_prefix + "/") or "\\" in target:
        return default
    return target


@bp.post("/sign-out")
def sign_out():
    _sessions().delete(request.cookies.get(SESSION_COOKIE))
    response = redirect(url_for("console.sign_in"), 303)
    response.delete_cookie(SESSION_COOKIE, path=bp.url_prefix, secure=request.is_secure, httponly=True,
                           samesite="Strict")
    return response


# -- overview -------------------------------------------------------------------------------------

@bp.get("/")
def overview():
    return render_template("console/overview.html", page="overview")


@bp.get("/overview.json")
def overview_data():
    svc = services()
    with svc.sessions() as db:
        waiting = figures.waiting_by_lane(db)
        yours = figures.jobs_by_status(db, current_owner())
        everyone = store.count_by_status(db)
        latency = figures.recent_latency(db)
    workers = live_workers(svc.redis, svc.channels)
    return jsonify({
        "time": time.time(),
        "queue": {"waiting": {lane: {str(p): n for p, n in sorted(by.items())} for lane, by in waiting.items()},
                  "broker_tasks": queue_depth(svc.redis, svc.channels, svc.settings.queue)},
        "jobs": {"yours": {status: yours.get(status, 0) for status in ALL_STATUSES},
                 "finished_all_keys": sum(everyone.get(s.value, 0) for s in JobStatus if s.is_final)},
        "latency": {"jobs": latency.jobs, "ttft": {f"p{p}": v for p, v in latency.ttft.items()},
                    "tpot": {f"p{p}": v for p, v in latency.tpot.items()}},
        "workers": [_worker_card(report) for report in sorted(workers, key=lambda r: r["worker_id"])],
    })


def _worker_card(report: dict) -> dict:
    engine = report.get("engine") or {}
    return {
        "id": report.get("worker_id"), "model": report.get("model"), "device": report.get("device"),
        "pid": report.get("pid"), "max_num_seqs": report.get("max_num_seqs"), "reported_at": report.get("reported_at"),
        **{name: engine.get(name) for name in ("running", "waiting", "kv_blocks_used", "kv_blocks_total",
                                               "max_batch_size", "jobs_in_flight", "generation_tokens",
                                               "preemptions", "healthy", "tensor_parallel_size")},
    }


# -- jobs -----------------------------------------------------------------------------------------

@bp.get("/jobs")
def jobs():
    status = request.args.get("status") or None
    if status is not None and status not in ALL_STATUSES:
        status = None
    cursor = request.args.get("cursor") or None
    before = decode_cursor(cursor) if cursor else None
    with services().sessions() as db:
        page = store.list_jobs(db, current_owner(), status=status, limit=PAGE_SIZE + 1, before=before)
    more, page = len(page) > PAGE_SIZE, page[:PAGE_SIZE]
    older = url_for("console.jobs", cursor=encode_cursor(page[-1].id), **({"status": status} if status else {})) \
        if more else None
    return render_template("console/jobs.html", page="jobs", jobs=page, status=status, statuses=ALL_STATUSES,
                           older=older, first_page=cursor is None, excerpt=_excerpt)


def _excerpt(job: Job, limit: int = 80) -> str:
    data = job.input or {}
    text = data.get("prompt")
    if text is None:
        messages = data.get("messages") or []
        text = str(messages[-1].get("content", "")) if messages and isinstance(messages[-1], dict) else ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    found = find_job(job_id)
    with services().sessions() as db:
        webhooks = webhooks_body(db, job_id)
    params = {name: value for name, value in found.input.items() if name not in ("prompt", "messages")}
    notice = {"requested": "Cancel requested: the worker is stopping the job.",
              "finished": "The job had already finished; nothing was canceled."}.get(request.args.get("cancel", ""))
    return render_template("console/job.html", page="jobs", job=found, data=job_to_dict(found, request.host_url),
                           params=params, webhooks=webhooks, notice=notice,
                           final=JobStatus(found.status).is_final)


@bp.get("/jobs/<job_id>/state")
def job_state(job_id: str):
    found = find_job(job_id)
    with services().sessions() as db:
        webhooks = webhooks_body(db, job_id)
    return jsonify({"job": job_to_dict(found, request.host_url), "webhooks": webhooks})


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    """The job's SSE stream (as GET /v1/jobs/{id}/events), signed in by cookie; the browser resumes
    with Last-Event-ID, a second after a drop."""
    found = find_job(job_id)
    stream = sse_stream(services(), found.id, current_owner(), last_event_id())

    def with_retry():
        yield f"retry: {SSE_RETRY_MS}\n\n"
        yield from stream

    return Response(with_retry(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    charge_request(current_key())
    outcome = cancel(services(), job_id, current_owner())
    if outcome is CancelOutcome.NOT_FOUND:
        raise Problem(404, f"no job with id {job_id}", title="Job not found", type="job-not-found")
    notice = {CancelOutcome.ALREADY_FINAL: "finished", CancelOutcome.REQUESTED: "requested"}.get(outcome)
    return redirect(url_for("console.job", job_id=job_id, **({"cancel": notice} if notice else {})), 303)


# -- submit ---------------------------------------------------------------------------------------

@bp.route("/submit", methods=["GET", "POST"])
def submit_job():
    if request.method == "GET":
        return _submit_page({})
    charge_request(current_key())
    events = [e for e in request.form.getlist("webhook_events") if e in forms.WEBHOOK_EVENTS]
    try:
        spec = JobCreate.model_validate(forms.job_body(request.form, events))
        svc = services()
        served_model(svc.settings, spec.model)
        check_webhook(spec, svc.settings)
        submission = Submission(key=current_key(), model=spec.model, input=spec.stored_input(),
                                priority=spec.priority, metadata=spec.metadata, service_tier=spec.service_tier)
        submitted = submit(svc, admission(), submission,
                           in_transaction=lambda session, new: register_webhook(session, new.id, spec))
    except forms.FormError as exc:
        return _submit_page(request.form, [str(exc)], 422)
    except ValidationError as exc:
        return _submit_page(request.form, [e["message"] if not e["field"] else f"{e['field']}: {e['message']}"
                                           for e in validation_problem(exc).extensions["errors"]], 422)
    except UnknownModel as exc:
        return _submit_page(request.form, [str(exc)], 422)
    except SubmissionRefused as refusal:
        problem = refused(refusal)
        return _submit_page(request.form, [problem.detail], problem.status)
    except Problem as problem:
        return _submit_page(request.form, [problem.detail], problem.status)
    submitted.close()
    return redirect(url_for("console.job", job_id=submitted.job.id), 303)


def _submit_page(values, errors: list[str] | None = None, status: int = 200):
    return render_template("console/submit.html", page="submit", values=values, errors=errors or [],
                           formats=forms.FORMATS, tiers=forms.SERVICE_TIERS, webhook_events=forms.WEBHOOK_EVENTS,
                           checked_events=values.getlist("webhook_events") if hasattr(values, "getlist") else [],
                           csrf_field=CSRF_FIELD), status


# -- batches --------------------------------------------------------------------------------------

@bp.get("/batches")
def batches():
    after = request.args.get("after") or None
    if after is not None and not well_formed_id(after, batch_store.BATCH_ID_PREFIX):
        after = None
    with services().sessions() as db:
        page = batch_store.list_batches(db, current_owner(), limit=PAGE_SIZE + 1, after=after)
        more, page = len(page) > PAGE_SIZE, page[:PAGE_SIZE]
        counts = batch_store.jobs_counts(db, [b.id for b in page])
        rows = [(b, batch_store.request_counts(b, counts[b.id])) for b in page]
    older = url_for("console.batches", after=page[-1].id) if more else None
    return render_template("console/batches.html", page="batches", rows=rows, older=older)


@bp.get("/files/<file_id>")
def download_file(file_id: str):
    with services().sessions() as db:
        file = file_store.get_file(db, file_id, current_owner())
    if file is None:
        raise Problem(404, f"no file with id {file_id}", title="File not found", type="file-not-found")
    return send_file(io.BytesIO(file.content), mimetype="application/jsonl", as_attachment=True,
                     download_name=file.filename)
