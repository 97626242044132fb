"""The page written by `hnet export onnx --web`, served on a free local port and opened in headless
chromium through selenium: the set-up shared by tests/test_js_runtime.py and bench/bench_js.py."""

from __future__ import annotations

import functools
import http.server
import os
import threading

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def missing() -> str | None:
    """Why the browser cannot run here, or None when selenium, chromium and chromedriver are all present."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(exe):
            return f"{exe} is missing (apt-get install chromium chromium-driver)"
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class WebPage:
    """`site` (a --web folder) served over HTTP and open in headless chromium; use as a context manager.

    The page reports through its #status element's data-state: "loading", then "ready" (graphs fetched,
    sessions created) or "error"; after a prompt is typed, "done" or "error"."""

    def __init__(self, site: str, profile: str, window: str = "1000,640"):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=site))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--window-size={window}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        try:
            self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        except BaseException:
            self.server.shutdown()
            raise

    def __enter__(self) -> "WebPage":
        return self

    def __exit__(self, *exc) -> None:
        self.driver.quit()
        self.server.shutdown()

    def element(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def wait(self, states: tuple[str, ...], timeout: float) -> str:
        """Wait until #status's data-state is one of `states`; return it."""
        from selenium.webdriver.support.ui import WebDriverWait

        status = self.element("status")
        WebDriverWait(self.driver, timeout).until(lambda d: status.get_attribute("data-state") in states)
        return status.get_attribute("data-state")

    def load(self, timeout: float) -> str:
        """Open index.html and wait for "ready" or "error"."""
        self.driver.get(f"http://127.0.0.1:{self.server.server_port}/index.html")
        return self.wait(("ready", "error"), timeout)

    def set_field(self, element_id: str, value) -> None:
        box = self.element(element_id)
        box.clear()
        box.send_keys(str(value))

    def set_max_tokens(self, tokens: int) -> None:
        self.set_field("max-tokens", tokens)

    def generate(self, prompt: str, timeout: float, clear: bool = False) -> str:
        """Type `prompt` (an input event: the page generates once typing pauses); wait for "done" or "error"."""
        box = self.element("prompt")
        if clear:
            box.clear()
        box.send_keys(prompt)
        return self.wait(("done", "error"), timeout)
