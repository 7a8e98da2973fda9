"""`genq submit` and `genq jobs`: use a running service through its HTTP API."""
from __future__ import annotations

import json
import sys

from app.cli.args import API_URL_HELP, settings_from_args
from app.cli.client import FINAL, JobsClient
from app.cli.keys import client_api_key


def add_commands(commands) -> None:
    submit = commands.add_parser("submit", help="submit a job and print its output")
    submit.add_argument("prompt")
    submit.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    submit.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its text")
    submit.add_argument("--max-tokens", type=int, default=128)
    submit.add_argument("--temperature", type=float, default=0.7)
    submit.add_argument("--priority", type=int, default=0)
    shape = submit.add_mutually_exclusive_group()   # structured output (docs/structured-outputs.md)
    shape.add_argument("--json-schema", metavar="FILE", help="answer JSON valid against the JSON Schema in FILE")
    shape.add_argument("--json", action="store_true", help="answer any JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="answer text the regular expression matches")
    shape.add_argument("--choice", metavar="TEXT", action="append", help="answer one of these (repeat the option)")
    submit.add_argument("--url", help=API_URL_HELP)
    submit.set_defaults(func=cmd_submit)

    jobs = commands.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--url", help=API_URL_HELP)
    jobs.set_defaults(func=cmd_jobs)


def _client(args):
    settings = settings_from_args(args)
    return JobsClient(settings.api_url, api_key=client_api_key(settings))


def cmd_submit(args) -> int:
    client = _client(args)
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "priority": args.priority}
    body.update({"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt})
    try:
        response_format = _response_format(args)
    except (OSError, ValueError) as exc:
        print(f"error: --json-schema {args.json_schema}: {exc}", file=sys.stderr)
        return 2
    if response_format is not None:
        body["response_format"] = response_format
    response = client.submit(body, wait=60 if args.wait and not args.stream else None)
    job = response.json()
    if response.status_code >= 400:
        print(f"error {response.status_code}: {job.get('detail', job)}", file=sys.stderr)
        return 1
    if args.stream:
        for event in client.events(job["id"], timeout=600):
            if event.event == "token":
                sys.stdout.write(event.data["text"])
                sys.stdout.flush()
            elif event.event == "error":
                print(f"\nerror: {event.data['type']}: {event.data['message']}", file=sys.stderr)
            elif event.event == "done":
                break
        print()
        job = client.get(job["id"])
        _print_summary(job)
        return 0 if job["status"] == "succeeded" else 1
    if args.wait:
        if job["status"] not in FINAL:
            job = client.wait(job["id"])
        print(job["output"]["text"] or "")
        _print_summary(job)
        return 0 if job["status"] == "succeeded" else 1
    print(json.dumps({"id": job["id"], "status": job["status"], "urls": job["urls"]}, indent=2))
    return 0


def _response_format(args) -> dict | None:
    if args.json_schema:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in
                       args.json_schema.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if args.json:
        return {"type": "json_object"}
    if args.regex:
        return {"type": "regex", "pattern": args.regex}
    if args.choice:
        return {"type": "choice", "choices": args.choice}
    return None


def _print_summary(job: dict) -> None:
    metrics, usage = job["metrics"], job["usage"]
    parts = [f"job {job['id']}", job["status"]]
    if job["output"]["finish_reason"]:
        parts.append(f"finish_reason={job['output']['finish_reason']}")
    if usage["completion_tokens"] is not None:
        parts.append(f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens")
    if metrics["time_to_first_token_seconds"] is not None:
        parts.append(f"ttft={metrics['time_to_first_token_seconds']:.3f}s")
    if metrics["tokens_per_second"] is not None:
        parts.append(f"{metrics['tokens_per_second']:.1f} tok/s")
    if job["error"]:
        parts.append(f"error={job['error']['type']}: {job['error']['message']}")
    print(" | ".join(parts), file=sys.stderr)


def cmd_jobs(args) -> int:
    client = _client(args)
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    page = client.list(**params)
    rows = [("ID", "STATUS", "CREATED", "TOKENS", "TTFT", "OUTPUT")]
    for job in page["data"]:
        ttft = job["metrics"]["time_to_first_token_seconds"]
        text = (job["output"]["text"] or "").replace("\n", " ")
        rows.append((job["id"], job["status"], (job["created_at"] or "")[:19].replace("T", " "),
                     "" if job["usage"]["completion_tokens"] is None else str(job["usage"]["completion_tokens"]),
                     "" if ttft is None else f"{ttft:.3f}s", text[:40] + ("…" if len(text) > 40 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if page.get("next_cursor"):
        print(f"(more: --limit or GET {page['next']})")
    return 0
