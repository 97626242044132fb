"""The JavaScript unit tests (export/js/test, `node --test`) run from the one test command, `python -m pytest`:
their failures show up here with node's own report."""

from __future__ import annotations

import subprocess


def test_node_unit_tests_pass(js_packages):
    run = subprocess.run(["node", "--test", "test/"], cwd=js_packages, capture_output=True, text=True, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"`node --test test/` in export/js failed (exit {run.returncode}):\n{report}"
    assert "# fail 0" in report and "# pass 0" not in report, report  # node ran tests, and none failed
