"""/v1/files (OpenAI's Files API, for batches): upload a JSONL file, read its object and content."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from app.api.auth import current_owner
from app.api.openai import openai_error_response, openai_unavailable_response
from app.api.services import services
from app.infra.problems import Unavailable
from app.jobs.inputs import plain_text
from app.openai import files
from app.openai.formats import OpenAIError

bp = Blueprint("files", __name__, url_prefix="/v1/files")

PURPOSES = (files.BATCH_PURPOSE,)


bp.register_error_handler(OpenAIError, openai_error_response)
bp.register_error_handler(Unavailable, openai_unavailable_response)


@bp.post("")
def upload_file():
    purpose = request.form.get("purpose")
    upload = request.files.get("file")
    if purpose not in PURPOSES:
        raise OpenAIError(400, f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", param="purpose")
    if upload is None:
        raise OpenAIError(400, "send the file as multipart/form-data field 'file'", param="file")
    filename = upload.filename or "upload.jsonl"
    if not plain_text(filename) or len(filename) > 255:
        raise OpenAIError(400, "the file name must be at most 255 characters of text", param="file")
    content = upload.read()
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        raise OpenAIError(400, "a batch file must be UTF-8 JSONL", param="file") from None
    with services().sessions.begin() as session:
        file = files.create_file(session, owner=current_owner(), purpose=purpose,
                                 filename=filename, content=content)
        body = files.file_to_dict(file)
    return jsonify(body)


@bp.get("")
def list_files():
    with services().sessions() as session:
        data = [files.file_to_dict(f) for f in files.list_files(session, current_owner())]
    return jsonify({"object": "list", "data": data, "has_more": False})


def _find(file_id: str):
    with services().sessions() as session:
        file = files.get_file(session, file_id, current_owner())
    if file is None:
        raise OpenAIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
    return file


@bp.get("/<file_id>")
def get_file(file_id: str):
    return jsonify(files.file_to_dict(_find(file_id)))


@bp.get("/<file_id>/content")
def file_content(file_id: str):
    file = _find(file_id)
    return Response(file.content, mimetype="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{file.filename}"'})
