"""Regenerate docs/web_demo.png: the bundled model's web page, run from its address in headless Chromium.

    .venv/bin/python docs/make_web_demo.py [--out docs/web_demo.png]

Exports the bundled demo model with `hnet export onnx --web` into a temporary directory, serves it
on 127.0.0.1, opens `index.html?prompt=...&autorun=1` (the page fills its fields from the address and
starts), waits for the generation to finish and saves the screenshot. Needs export/js/node_modules
(`npm ci`), /usr/bin/chromium, chromedriver and selenium (the browser test's setup).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hnet_core import io  # noqa: E402
from hnet_core.backends import DEMO_MODEL  # noqa: E402

# What the picture shows: the page's own sampling defaults, a fixed seed so a rerun draws the same bytes.
DEMO = {"prompt": "The history of the city", "bytes": 200, "temperature": 0.8, "top_p": 0.95, "seed": 7}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--window-size=1100,760")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def screenshot(site: str, out: str, profile: str) -> str:
    """Open the page at `site` with DEMO in its address; returns the status line it ended with."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/index.html?{urllib.parse.urlencode(DEMO)}&autorun=1")
        status = driver.find_element(By.ID, "status")
        WebDriverWait(driver, 600).until(lambda d: status.get_attribute("data-state") in ("done", "error"))
        if status.get_attribute("data-state") != "done":
            raise SystemExit(f"the page ended in an error: {status.text}")
        with io.atomic_file(out, what="screenshot") as tmp:
            with open(tmp, "wb") as f:
                f.write(driver.get_screenshot_as_png())
        return status.text
    finally:
        driver.quit()
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "web_demo.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = os.path.join(tmp, "site")
        subprocess.run([sys.executable, "-m", "hnet_core.cli", "export", "onnx", "--model", DEMO_MODEL, "--out",
                        os.path.join(tmp, "onnx"), "--web", site], check=True, cwd=REPO)
        line = screenshot(site, args.out, os.path.join(tmp, "profile"))
    print(f"wrote {args.out}: {line}")


if __name__ == "__main__":
    main()
