"""RFC 9457 problem details: every error the API returns is `application/problem+json`.

A dependency outage (app/infra/problems.py `outage`: the database or Redis down, wherever in the
request it surfaces) is `503` + `Retry-After` naming the dependency, never a 500; the OpenAI-compatible
blueprints answer it in their own error shape (their handler for `Unavailable`). Anything else
unhandled is a bug: a generic 500, logged with its traceback.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, json, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from app.infra.problems import Problem, outage

log = logging.getLogger(__name__)

PROBLEM_MIME = "application/problem+json"
PROBLEM_BASE = "urn:genq:problem:"


def problem_response(status: int, detail: str, *, title: str | None = None, type: str | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> Response:
    from http import HTTPStatus

    body = {
        "type": PROBLEM_BASE + type if type else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.path if request else None,
        **extensions,
    }
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIME)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def validation_problem(exc: ValidationError) -> Problem:
    errors = [{"field": ".".join(str(part) for part in err["loc"]) or None, "message": err["msg"],
               "type": err["type"]} for err in exc.errors(include_url=False, include_context=False,
                                                          include_input=False)]
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return Problem(422, detail, title="Invalid request body", type="validation-error", errors=errors)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Problem)
    def _problem(exc: Problem):
        return problem_response(exc.status, exc.detail, title=exc.title, type=exc.type, headers=exc.headers,
                                **exc.extensions)

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError):
        return _problem(validation_problem(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type", "content-length")}
        return problem_response(exc.code or 500, exc.description or exc.name, title=exc.name, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        unavailable = outage(exc)
        if unavailable is not None:
            log.warning("%s %s: %s is down (%s: %s)", request.method, request.path, unavailable.dependency,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            # dispatched again, so that a blueprint's own handler for `Unavailable` (the OpenAI shape) applies
            return current_app.handle_user_exception(unavailable)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "the server failed to handle this request; it has been logged")
