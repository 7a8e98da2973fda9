"""/v1/batches (OpenAI's Batch API): create, get, list and cancel batches of requests."""
from __future__ import annotations

import json
import logging

from flask import Blueprint, jsonify, request

from app.api.auth import current_owner
from app.api.openai import openai_error_response, openai_unavailable_response
from app.api.services import services
from app.infra.broker import send_start_batch
from app.infra.ids import well_formed_id
from app.infra.db import utcnow
from app.infra.problems import Unavailable
from app.jobs.inputs import MAX_METADATA_BYTES, plain_text
from app.openai import batches
from app.openai import files
from app.openai.formats import ENDPOINTS, OpenAIError

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")


bp.register_error_handler(OpenAIError, openai_error_response)
bp.register_error_handler(Unavailable, openai_unavailable_response)


def _batch_response(session, batch):
    return jsonify(batches.batch_to_dict(batch, batches.job_counts(session, batch.id)))


@bp.post("")
def create_batch():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window, metadata = body.get("completion_window"), body.get("metadata")
    if unknown := set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}")
    if endpoint not in ENDPOINTS:
        raise OpenAIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    if window not in batches.COMPLETION_WINDOWS:
        raise OpenAIError(400, f"completion_window must be one of {', '.join(batches.COMPLETION_WINDOWS)}",
                          param="completion_window")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(v, str) for v in metadata.values()) or len(json.dumps(metadata)) > MAX_METADATA_BYTES):
        raise OpenAIError(400, "metadata must be an object of at most 16 string values", param="metadata")
    if metadata and any(not plain_text(text) for text in (*metadata, *metadata.values())):
        raise OpenAIError(400, "metadata must be text without control characters or unpaired surrogates",
                          param="metadata")
    svc, owner = services(), current_owner()
    with svc.sessions.begin() as session:
        file = files.get_file(session, file_id, owner) if isinstance(file_id, str) else None
        if file is None or file.purpose != files.BATCH_PURPOSE:
            raise OpenAIError(400 if file is not None else 404, f"no batch input file {file_id!r}",
                              param="input_file_id", code="file_not_found")
        batch = batches.create_batch(session, owner=owner, input_file_id=file.id, endpoint=endpoint,
                                     completion_window=window, metadata=metadata)
        batch_id = batch.id
    try:
        send_start_batch(svc.celery, svc.settings, batch_id)
    except Exception as exc:
        # The batch is committed: a worker's reconciler sends its start task once the broker is
        # back (a batch `validating` for GENQ_REQUEUE_AFTER_SECONDS), as for jobs.
        log.warning("could not queue batch %s (%s: %s); it waits in the database", batch_id,
                    type(exc).__name__, exc)
    with svc.sessions() as session:
        return _batch_response(session, batches.get_batch(session, batch_id, owner))


@bp.get("")
def list_batches():
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise OpenAIError(400, "limit must be an integer", param="limit") from None
    if not 1 <= limit <= 100:
        raise OpenAIError(400, "limit must be between 1 and 100", param="limit")
    after = request.args.get("after") or None
    if after is not None and not well_formed_id(after, batches.BATCH_ID_PREFIX):
        raise OpenAIError(400, "after must be a batch id", param="after")
    with services().sessions() as session:
        page = batches.list_batches(session, current_owner(), limit=limit + 1, after=after)
        more, page = len(page) > limit, page[:limit]
        counts = batches.jobs_counts(session, [b.id for b in page])
        data = [batches.batch_to_dict(b, counts[b.id]) for b in page]
    return jsonify({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more})


@bp.get("/<batch_id>")
def get_batch(batch_id: str):
    svc = services()
    with svc.sessions() as session:
        batch = batches.get_batch(session, batch_id, current_owner())
        if batch is None:
            raise OpenAIError(404, f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
        due = batch.status in ("validating", "in_progress") and batch.expires_at < utcnow()
        if not due:
            return _batch_response(session, batch)
    # Due: expire it now rather than wait for the reconciler's next batch sweep.
    batches.expire(svc.sessions, svc.redis, svc.channels, batch_id)
    with svc.sessions() as session:
        return _batch_response(session, batches.get_batch(session, batch_id, current_owner()))


@bp.post("/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    svc, owner = services(), current_owner()
    with svc.sessions.begin() as session:
        batch, running = batches.cancel_batch(session, batch_id, owner)
    if batch is None:
        raise OpenAIError(404, f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
    batches.stop_lines(svc.sessions, svc.redis, svc.channels, batch_id, running)
    with svc.sessions() as session:
        return _batch_response(session, batches.get_batch(session, batch_id, owner))
