"""`genq batch input.jsonl -o output.jsonl`: submit an OpenAI-style batch file, show a progress bar
until it ends, and write its results (and its errors, if any) as JSONL. Ctrl-C cancels the batch."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import requests

from app.cli.args import API_URL_HELP, settings_from_args
from app.cli.keys import client_api_key

FINAL = ("completed", "failed", "expired", "cancelled")
POLL_SECONDS = 0.5
BAR_WIDTH = 30


def add_commands(commands) -> None:
    batch = commands.add_parser("batch", help="run a batch file (OpenAI Batch API JSONL) and write its results")
    batch.add_argument("input", type=Path, help="JSONL: {custom_id, method, url, body} per line")
    batch.add_argument("-o", "--output", type=Path, required=True, help="where the results go (JSONL)")
    batch.add_argument("--errors", type=Path, help="where failed lines go (default: OUTPUT with .errors.jsonl)")
    batch.add_argument("--endpoint", default="/v1/chat/completions",
                       choices=["/v1/chat/completions", "/v1/completions"])
    batch.add_argument("--url", help=API_URL_HELP)
    batch.set_defaults(func=cmd_batch)


class BatchClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60):
        self.base = base_url.rstrip("/") + "/v1"
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.http.request(method, self.base + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("error", {}).get("message") or body.get("detail") or response.text
            except ValueError:
                message = response.text
            raise SystemExit(f"genq batch: {method} {path} failed ({response.status_code}): {message}")
        return response

    def upload(self, path: Path) -> str:
        with path.open("rb") as handle:
            return self._call("POST", "/files", files={"file": (path.name, handle, "application/jsonl")},
                              data={"purpose": "batch"}).json()["id"]

    def create(self, file_id: str, endpoint: str) -> dict:
        return self._call("POST", "/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                    "completion_window": "24h"}).json()

    def get(self, batch_id: str) -> dict:
        return self._call("GET", f"/batches/{batch_id}").json()

    def cancel(self, batch_id: str) -> dict:
        return self._call("POST", f"/batches/{batch_id}/cancel").json()

    def content(self, file_id: str) -> bytes:
        return self._call("GET", f"/files/{file_id}/content").content


def progress_line(batch: dict) -> str:
    counts = batch["request_counts"]
    total, done, failed = counts["total"], counts["completed"], counts["failed"]
    filled = int(BAR_WIDTH * (done + failed) / total) if total else 0
    return (f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done + failed}/{total or '?'}"
            f"  ({failed} failed)  {batch['status']:<12}")


def cmd_batch(args) -> int:
    settings = settings_from_args(args)
    client = BatchClient(settings.api_url, client_api_key(settings))
    batch = client.create(client.upload(args.input), args.endpoint)
    print(f"genq: batch {batch['id']} ({args.input})", file=sys.stderr)
    try:
        while batch["status"] not in FINAL:
            print(progress_line(batch), end="", file=sys.stderr, flush=True)
            time.sleep(POLL_SECONDS)
            batch = client.get(batch["id"])
    except KeyboardInterrupt:
        print(f"\ngenq: cancelling batch {batch['id']}", file=sys.stderr)
        batch = client.cancel(batch["id"])
        while batch["status"] not in FINAL:
            time.sleep(POLL_SECONDS)
            batch = client.get(batch["id"])
    print(progress_line(batch), file=sys.stderr)
    if batch["status"] == "failed":
        errors = (batch.get("errors") or {}).get("data") or []
        print("genq: the batch failed: " + "; ".join(e.get("message", "") for e in errors), file=sys.stderr)
        return 1
    args.output.write_bytes(client.content(batch["output_file_id"]) if batch.get("output_file_id") else b"")
    print(f"genq: {batch['request_counts']['completed']} result(s) in {args.output}", file=sys.stderr)
    if batch.get("error_file_id"):
        errors_path = args.errors or args.output.with_name(args.output.stem + ".errors.jsonl")
        errors_path.write_bytes(client.content(batch["error_file_id"]))
        print(f"genq: {batch['request_counts']['failed']} failed line(s) in {errors_path}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1
