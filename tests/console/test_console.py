"""The web console (/ui) in headless Chromium on the real stack: sign-in, submit, live tokens, a
stream resumed after a network drop, cancel, tenancy, the overview's worker card, CSRF, XSS, and no
JavaScript errors on any page."""
from __future__ import annotations

import json
import time

import pytest
import requests

from tests.console.conftest import wait_for

pytestmark = pytest.mark.timeout(300)

LONG_JOB = {"max_tokens": 1800, "ignore_eos": True, "temperature": 0}

# Untrusted content: each payload sets window.__xss (or opens an alert) if it ever runs.
SCRIPT = '<script>window.__xss = "script"</script>'
IMG = '<img src=x onerror="window.__xss = \'img\'">'
LINK = '<a href="javascript:window.__xss = \'link\'">click me</a>'
# long enough (about 1,000 characters, a token per character or so) to be still running when the page opens
FORCED_OUTPUT = f'{IMG}{SCRIPT}<svg onload="alert(1)"></svg>{LINK}' * 6


# -- helpers ----------------------------------------------------------------------------------------

def api(stack, method: str, path: str, key: str | None = None, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key or stack.api_key}", **kwargs.pop("headers", {})}
    return requests.request(method, stack.api_url + path, headers=headers, timeout=30, **kwargs)


def submit_api(stack, body: dict, key: str | None = None) -> str:
    response = api(stack, "POST", "/v1/jobs", key, json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_status(stack, job_id: str) -> dict:
    return api(stack, "GET", f"/v1/jobs/{job_id}").json()


def wait_final(stack, job_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (job := job_status(stack, job_id))["status"] in ("succeeded", "failed", "canceled")
                    and job, timeout, message=f"job {job_id} to end")


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, element_id: str) -> str | None:
    """An element's text content exactly (Selenium's `.text` trims and folds whitespace); None while
    there is no such element (a page loading)."""
    from selenium.common.exceptions import WebDriverException

    try:
        return driver.execute_script("const node = document.getElementById(arguments[0]);"
                                     "return node ? node.textContent : null", element_id)
    except WebDriverException:
        return None


def as_html_text(text: str) -> str:
    """`text` as a page's DOM holds it after the HTML parser read it as body text: CR LF and CR become
    LF, and a NUL character is dropped (the "in body" insertion mode ignores U+0000; a random model's
    output has them); text set from a script (textContent) is kept as it is."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def severe_logs(driver) -> list[dict]:
    """What the page logged as errors since the last call (JavaScript errors, CSP violations,
    failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def sign_in(driver, stack, key: str | None = None) -> None:
    driver.delete_all_cookies()
    driver.get(stack.url + "/ui/sign-in")
    by_id(driver, "api_key").send_keys(key or stack.api_key)
    by_id(driver, "sign-in").click()
    wait_for(lambda: driver.current_url.rstrip("/").endswith("/ui"), 10, message="the overview after sign-in")


def signed_in(driver, stack) -> None:
    if not driver.current_url.startswith(stack.url) or driver.get_cookie("genq_console") is None:
        sign_in(driver, stack)


def open_job(driver, stack, job_id: str) -> None:
    driver.get(f"{stack.url}/ui/jobs/{job_id}")
    wait_for(lambda: css(driver, "#job-status"), 10, message="the job page")


def page_status(driver) -> str | None:
    return text_of(driver, "job-status")


def cookie_session(driver, stack) -> requests.Session:
    """An HTTP client holding the browser's console cookie (and nothing else)."""
    session = requests.Session()
    session.cookies.set("genq_console", driver.get_cookie("genq_console")["value"], path="/ui")
    return session


def csrf_token(driver) -> str:
    return css(driver, "input[name=csrf_token]")[0].get_attribute("value")


# -- tests ------------------------------------------------------------------------------------------

def test_sign_in_sets_a_strict_httponly_session_cookie_and_never_puts_the_key_in_a_url(browser, console_stack):
    stack, driver = console_stack, browser
    driver.delete_all_cookies()
    driver.get(stack.url + "/ui/jobs")
    wait_for(lambda: "/ui/sign-in" in driver.current_url, 10, message="the redirect to sign-in")
    by_id(driver, "api_key").send_keys("gq_not-a-real-key")
    by_id(driver, "sign-in").click()
    assert "unknown or revoked" in wait_for(lambda: css(driver, ".error"), 10)[0].text
    assert driver.get_cookie("genq_console") is None
    driver.get_log("browser")   # the refused sign-in's 401 is logged as a failed load: expected

    by_id(driver, "api_key").send_keys(stack.api_key)
    by_id(driver, "sign-in").click()
    wait_for(lambda: driver.current_url.endswith("/ui/jobs"), 10, message="back to the page asked for")
    cookie = driver.get_cookie("genq_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert stack.api_key not in cookie["value"]
    history = driver.execute_script("return performance.getEntriesByType('navigation').map(e => e.name)")
    assert not any(stack.api_key in url for url in history + [driver.current_url])

    headers = requests.get(stack.url + "/ui/sign-in", timeout=10).headers
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert headers["X-Frame-Options"] == "DENY"
    assert severe_logs(driver) == []


def test_submit_shows_tokens_before_the_job_ends_then_cancel_shows_canceled(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    driver.get(stack.url + "/ui/submit")
    by_id(driver, "f-prompt").send_keys("Tell me a long story")
    by_id(driver, "f-max_tokens").send_keys(str(LONG_JOB["max_tokens"]))
    by_id(driver, "f-temperature").send_keys("0")
    by_id(driver, "f-ignore_eos").click()
    by_id(driver, "f-metadata").send_keys('{"from": "console test"}')
    by_id(driver, "submit-button").click()
    wait_for(lambda: "/ui/jobs/" in driver.current_url, 10, message="the new job's page")
    job_id = driver.current_url.rsplit("/", 1)[1]
    stored = job_status(stack, job_id)
    assert stored["input"]["prompt"] == "Tell me a long story" and stored["input"]["ignore_eos"] is True
    assert stored["metadata"] == {"from": "console test"}

    # tokens on the page while the job is still running
    wait_for(lambda: text_of(driver, "output") and page_status(driver) == "running", 30,
             message="streamed text while running")
    assert job_status(stack, job_id)["status"] == "running"
    assert by_id(driver, "t-started").text != "—"

    by_id(driver, "cancel-button").click()
    wait_for(lambda: page_status(driver) == "canceled", 30, message="the page to say canceled")
    final = wait_final(stack, job_id)
    assert final["status"] == "canceled" and final["output"]["finish_reason"] == "abort"
    # the page may have been rendered by the server (the job had ended when the cancel's redirect
    # landed): as HTML text, where the parser turns CR into LF
    wait_for(lambda: text_of(driver, "output") in (final["output"]["text"], as_html_text(final["output"]["text"])), 30,
             message="the final text",
             describe=lambda: f"the page shows {text_of(driver, 'output')!r}, the job {final['output']['text']!r}")
    assert not by_id(driver, "cancel-form").is_displayed()
    assert by_id(driver, "u-completion").text == str(final["usage"]["completion_tokens"])
    assert severe_logs(driver) == []


def test_stream_resumes_after_a_network_drop_without_losing_or_repeating_text(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    job_id = submit_api(stack, {"prompt": "Resume after a drop", **LONG_JOB})
    open_job(driver, stack, job_id)
    wait_for(lambda: len(text_of(driver, "output")) > 20 and page_status(driver) == "running", 30,
             message="some streamed text")
    before = text_of(driver, "output")
    mark = len(stack.proxy.requests_sent())
    assert stack.proxy.drop() >= 1
    wait_for(lambda: "Last-Event-ID:" in stack.proxy.requests_sent()[mark:], 15,
             message="a reconnect with Last-Event-ID")
    final = wait_final(stack, job_id, timeout=120)
    assert final["status"] == "succeeded"
    wait_for(lambda: page_status(driver) == "succeeded", 15, message="the page to say succeeded")
    text = text_of(driver, "output")
    assert text == final["output"]["text"] and text.startswith(before)
    resumed = [line for line in stack.proxy.requests_sent()[mark:].splitlines() if line.startswith("Last-Event-ID:")]
    assert resumed and resumed[-1].split(":", 1)[1].strip() not in ("", "0-0")
    driver.get_log("browser")   # the drop itself is logged as a failed request: expected here


def test_another_keys_jobs_are_absent_and_their_pages_404(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    other_key = stack.new_key("someone else")
    theirs = submit_api(stack, {"prompt": "not yours", "max_tokens": 4}, key=other_key)
    mine = submit_api(stack, {"prompt": "mine", "max_tokens": 4})
    wait_final(stack, mine)
    driver.get(stack.url + "/ui/jobs")
    listed = {row.get_attribute("data-job-id") for row in css(driver, "#jobs-table tbody tr")}
    assert mine in listed and theirs not in listed
    assert theirs not in driver.page_source

    driver.get(f"{stack.url}/ui/jobs/{theirs}")
    assert "Job not found" in by_id(driver, "main").text and "not yours" not in driver.page_source
    client = cookie_session(driver, stack)
    for path in ("", "/state", "/events"):
        assert client.get(f"{stack.url}/ui/jobs/{theirs}{path}", timeout=10).status_code == 404
    assert client.get(f"{stack.url}/ui/jobs/{mine}/state", timeout=10).status_code == 200
    driver.get_log("browser")   # the 404 page's own load is logged as a failed resource: expected


def test_overview_shows_the_live_worker(browser, console_stack):
    from app.infra.channels import Channels
    from app.infra.redis_client import redis_client
    from app.infra.worker_reports import live_workers

    stack, driver = console_stack, browser
    signed_in(driver, stack)
    reports = live_workers(redis_client(stack.settings.redis_url), Channels(stack.settings.key_prefix))
    worker_id = reports[0]["worker_id"]
    driver.get(stack.url + "/ui/")
    card = wait_for(lambda: css(driver, f'li.worker[data-worker-id="{worker_id}"]'), 15, message="the worker card")[0]
    assert worker_id in card.text and stack.settings.model_name in card.text and "Status: live" in card.text
    assert "Device\ncpu" in card.text or "Device cpu" in card.text, card.text
    assert "KV cache:" in card.text and "blocks" in card.text and "Running requests:" in card.text
    assert len(card.find_elements("css selector", "meter")) == 2
    wait_for(lambda: by_id(driver, "tokens-rate").text != "—", 10, message="a throughput figure")
    assert by_id(driver, "broker-tasks").text.isdigit()
    counts = by_id(driver, "job-counts").text
    assert "succeeded" in counts and "canceled" in counts
    assert severe_logs(driver) == []


def test_state_changing_posts_need_the_csrf_token(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    job_id = submit_api(stack, {"prompt": "CSRF target", **LONG_JOB})
    open_job(driver, stack, job_id)
    token = csrf_token(driver)
    client = cookie_session(driver, stack)
    before = len(api(stack, "GET", "/v1/jobs?limit=100").json()["data"])

    refused = [
        client.post(f"{stack.url}/ui/jobs/{job_id}/cancel", allow_redirects=False, timeout=10),
        client.post(f"{stack.url}/ui/jobs/{job_id}/cancel", data={"csrf_token": "forged"}, allow_redirects=False,
                    timeout=10),
        client.post(f"{stack.url}/ui/jobs/{job_id}/cancel", data={"csrf_token": token}, allow_redirects=False,
                    headers={"Origin": "http://evil.example"}, timeout=10),
        client.post(f"{stack.url}/ui/submit", data={"prompt": "forged", "max_tokens": "4"}, allow_redirects=False,
                    timeout=10),
        client.post(f"{stack.url}/ui/sign-out", allow_redirects=False, timeout=10),
        requests.post(f"{stack.url}/ui/sign-in", data={"api_key": stack.api_key}, allow_redirects=False, timeout=10),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert all("Set-Cookie" not in r.headers or "genq_console=" not in r.headers["Set-Cookie"] for r in refused)
    assert job_status(stack, job_id)["status"] in ("queued", "running")
    assert len(api(stack, "GET", "/v1/jobs?limit=100").json()["data"]) == before

    # the same request with the token works (so the refusals above were the token's doing)
    allowed = client.post(f"{stack.url}/ui/jobs/{job_id}/cancel", data={"csrf_token": token},
                          headers={"Origin": stack.url}, allow_redirects=False, timeout=10)
    assert allowed.status_code == 303
    assert wait_final(stack, job_id)["status"] == "canceled"


# Runs in every page before the page's own scripts: records any element a payload could have become
# (even one the CSP then stops from running) and every CSP violation.
WATCH_PAGE = """
window.__injected = [];
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(e.violatedDirective));
new MutationObserver((records) => {
  for (const record of records) for (const node of record.addedNodes) {
    if (node.nodeType !== 1) continue;
    const tag = node.tagName.toLowerCase();
    const href = (node.getAttribute("href") || "").trim().toLowerCase();
    if (window.__injected.length < 5 && (["img", "svg", "iframe", "object", "embed"].includes(tag)
        || (tag === "a" && href.startsWith("javascript:"))
        || (tag === "script" && !(node.getAttribute("src") || "").startsWith("/ui/static/")))) {
      window.__injected.push(node.outerHTML.slice(0, 120));
    }
  }
}).observe(document, {childList: true, subtree: true});
"""


def test_untrusted_job_content_renders_as_text_and_runs_nothing(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    watch = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_PAGE})
    try:
        _check_untrusted_content(driver, stack)
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": watch["identifier"]})


def _check_untrusted_content(driver, stack) -> None:
    prompt = f"{SCRIPT} {IMG} {LINK}"
    metadata = {"note": prompt, "link": "javascript:window.__xss = 'metadata'", SCRIPT: IMG}
    job_id = submit_api(stack, {"prompt": prompt, "metadata": metadata, "max_tokens": 1500, "temperature": 0,
                                "response_format": {"type": "choice", "choices": [FORCED_OUTPUT]}})
    wait_for(lambda: job_status(stack, job_id)["status"] != "queued", 30, interval=0.05, message="the job to start")
    mark = len(stack.proxy.requests_sent())

    # live: the model's output arrives token by token through the stream
    open_job(driver, stack, job_id)
    wait_for(lambda: page_status(driver) == "succeeded", 120, message="the job to end on the page")
    assert f"GET /ui/jobs/{job_id}/events" in stack.proxy.requests_sent()[mark:]
    assert job_status(stack, job_id)["output"]["text"] == FORCED_OUTPUT
    assert text_of(driver, "output") == FORCED_OUTPUT
    _assert_inert(driver)

    # rendered by the server: the job page once final, and the jobs list
    for path in (f"/ui/jobs/{job_id}", "/ui/jobs"):
        driver.get(stack.url + path)
        wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 10)
        time.sleep(0.3)
        _assert_inert(driver)
        if path == "/ui/jobs":
            assert SCRIPT in text_of(driver, "jobs-table")      # the prompt's excerpt, as text
        else:
            assert text_of(driver, "output") == FORCED_OUTPUT
            assert text_of(driver, "input-prompt") == prompt
            assert json.loads(text_of(driver, "input-metadata")) == metadata
            assert json.dumps(FORCED_OUTPUT) in text_of(driver, "input-params")   # the constraint, as JSON text
    assert severe_logs(driver) == []


def _assert_inert(driver) -> None:
    """Nothing of the payloads became markup or ran."""
    from selenium.common.exceptions import NoAlertPresentException

    assert driver.execute_script("return window.__xss === undefined")
    assert driver.execute_script("return [window.__injected, window.__violations]") == [[], []]
    assert css(driver, "main img, main svg, main script, a[href^='javascript:']") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def test_every_page_loads_without_javascript_errors_labels_every_control_and_fits_a_phone(browser, console_stack):
    stack, driver = console_stack, browser
    signed_in(driver, stack)
    job_id = submit_api(stack, {"prompt": "A page to look at", "max_tokens": 8, "temperature": 0,
                                "webhook": stack.api_url + "/healthz"})
    batch_id = _finished_batch(stack)
    wait_final(stack, job_id)
    pages = ["/ui/", "/ui/jobs", "/ui/jobs?status=succeeded", f"/ui/jobs/{job_id}", "/ui/submit", "/ui/batches"]
    try:
        for width in (1280, 390):
            driver.set_window_size(width, 900)
            for path in pages:
                driver.get(stack.url + path)
                wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 10)
                time.sleep(0.5 if path == "/ui/" else 0.2)   # the overview's first poll
                assert severe_logs(driver) == [], path
                unlabelled = driver.execute_script("""
                    return [...document.querySelectorAll('input:not([type=hidden]), select, textarea, meter, progress')]
                      .filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label'))
                      .map(c => c.outerHTML)""")
                assert unlabelled == [], path
                assert driver.execute_script(
                    "return document.documentElement.scrollWidth <= window.innerWidth + 1"), (path, width)
    finally:
        driver.set_window_size(1280, 900)

    # the webhook's delivery attempts, with the receiver's answer (POST /healthz: 405)
    open_job(driver, stack, job_id)
    wait_for(lambda: "405" in (text_of(driver, "webhook-rows") or ""), 30, message="a delivery attempt")
    assert by_id(driver, "webhook-url").text == stack.api_url + "/healthz"

    # the batch's progress and files
    driver.get(stack.url + "/ui/batches")
    card = css(driver, f'li[data-batch-id="{batch_id}"]')[0]
    progress = card.find_element("css selector", "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"
    assert "2 completed, 0 failed, of 2" in card.text
    output_link = [a for a in card.find_elements("css selector", "a") if a.text == "output"][0]
    download = cookie_session(driver, stack).get(output_link.get_attribute("href"), timeout=10)
    assert download.status_code == 200 and len(download.text.strip().splitlines()) == 2
    assert requests.get(output_link.get_attribute("href"), allow_redirects=False, timeout=10).status_code == 303

    # the sign-in page, once signed out
    by_id(driver, "main")
    css(driver, ".sign-out button")[0].click()
    wait_for(lambda: "/ui/sign-in" in driver.current_url, 10, message="the sign-in page")
    assert driver.get_cookie("genq_console") is None
    assert severe_logs(driver) == []


def _finished_batch(stack) -> str:
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": stack.settings.model_name, "prompt": f"batch line {i}", "max_tokens": 4}})
             for i in range(2)]
    upload = api(stack, "POST", "/v1/files", data={"purpose": "batch"},
                 files={"file": ("lines.jsonl", "\n".join(lines).encode(), "application/jsonl")})
    assert upload.status_code == 200, upload.text
    created = api(stack, "POST", "/v1/batches", json={"input_file_id": upload.json()["id"],
                                                      "endpoint": "/v1/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    wait_for(lambda: api(stack, "GET", f"/v1/batches/{batch_id}").json()["status"] == "completed", 120,
             interval=0.3, message="the batch to complete")
    return batch_id
