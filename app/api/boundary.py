"""The input boundary: what no view has to think about.

- `/openapi.json`: the OpenAPI 3.1 document (app/api/openapi/), open to everyone.
- Job ids in URLs must look like job ids (26 lowercase base-32 characters); anything else is 404
  before it reaches the database, Redis channel names or logs.
- Body size (Flask's MAX_CONTENT_LENGTH: 413), content type (415) and JSON parsing (400: invalid
  UTF-8, NaN/Infinity, nesting deeper than MAX_JSON_DEPTH) are checked in `app.api.request_parsing`.
"""
from __future__ import annotations

import re

from flask import Blueprint, Flask, jsonify

from app.api.openapi.document import build_document
from app.infra.problems import Problem

JOB_ID = re.compile(r"[0-9a-z]{26}")

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_document():
    return jsonify(build_document())


def install(app: Flask) -> None:
    app.register_blueprint(bp)

    @app.url_value_preprocessor
    def _check_ids(endpoint, values):
        job_id = (values or {}).get("job_id")
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise Problem(404, "no job with this id (job ids are 26 lowercase letters and digits)",
                          title="Job not found", type="job-not-found")
