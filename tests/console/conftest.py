"""The web console in a real browser: Debian's headless Chromium driven by Selenium, against the
whole service (the API on real HTTP behind a TCP proxy that can drop connections, one real
`genq worker` process on the tiny model, Redis, the primary database). One stack and one browser
per module. Without chromium and chromium-driver the tests skip, saying how to install them."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.console.proxy import DroppingProxy
from tests.support.service import ServerThread, WorkerProcess, build_tiny, create_test_key, service_settings

INSTALL_HINT = "apt-get install chromium chromium-driver"


def browser_paths() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("the console tests need selenium (pip install -e '.[dev]') and Debian's browser: " + INSTALL_HINT)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(f"the console tests need headless Chromium and its driver: {INSTALL_HINT}")
    return chromium, driver


@pytest.fixture(scope="module")
def chromium_paths():
    return browser_paths()


def start_browser(chromium: str, driver_path: str, tmp: Path, width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     f"--window-size={width},{height}", f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory, chromium_paths):
    """(settings, app, proxy URL the browser uses, API URL, API key, worker)."""
    from app.api import create_app

    tmp = tmp_path_factory.mktemp("console")
    model = build_tiny(tmp)
    with service_settings(tmp, model=str(model), max_num_seqs=16, lease_seconds=30,
                          webhook_allow_private=True) as settings, \
            WorkerProcess(settings, tmp / "worker.log") as worker:
        app = create_app(settings)
        with ServerThread(app) as server, DroppingProxy(server.port) as proxy:
            yield Stack(settings, app, proxy, server.url, server.api_key, worker)


class Stack:
    def __init__(self, settings, app, proxy, api_url, api_key, worker):
        self.settings, self.app, self.proxy, self.api_url, self.api_key, self.worker = (
            settings, app, proxy, api_url, api_key, worker)
        self.url = proxy.url          # where the browser goes (through the proxy)

    def new_key(self, name: str) -> str:
        return create_test_key(self.app, name)


@pytest.fixture(scope="module")
def browser(console_stack, chromium_paths, tmp_path_factory):
    driver = start_browser(*chromium_paths, tmp_path_factory.mktemp("browser"))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1, message: str = "condition", describe=None):
    """The first truthy value of `condition()`; AssertionError after `timeout` seconds (saying what
    `describe()` returns then, if given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}"
                                 + (f": {describe()}" if describe else ""))
        time.sleep(interval)
