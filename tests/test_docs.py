"""Every `bash` and `python` example in README.md and docs/*.md runs, so the docs cannot drift from the code.

One test per block, named after its page and its number among the page's bash/python blocks (`docs/onnx.md:3`).
The conventions (also in docs/README.md, "The examples are tests"):

- The blocks of a page run in order in one scratch directory holding links to everything in the repository root,
  so `hnet_core/demo_model` and `tests/fixtures/official/1stage_tiny` resolve and a later block sees what an
  earlier one wrote. Each block starts in that directory (`cd` does not carry over). bash blocks run with
  `bash -euo pipefail -c`, python blocks with this interpreter reading the block from stdin; this interpreter's
  directory comes first on PATH, so `hnet`, `hnet-mlx` and `python` are the project's.
- A line directly above a fence that starts with `Not run by the tests:` skips the block with that reason.
- A line directly above a fence that starts with `Slow:` marks the block `slow`. A block that is not slow runs after
  only the not-slow blocks before it (in a directory of its own), so it never depends on a slow one.
- Blocks in other languages (`text` for output, `js`, `json`) are not run; an unlabelled fence, or a shell or Python
  block labelled anything but `bash`/`python`, fails `test_docs_follow_the_example_conventions`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RUN = "Not run by the tests:"
SLOW = "Slow:"
RUN_LANGS = ("bash", "python")
# Labels that name code we would have to run but do not: they must say bash/python (or text, for output).
RUNNABLE_ALIASES = ("", "sh", "shell", "console", "zsh", "py", "python3", "pycon", "ipython")
TIMEOUT_S = 120  # a block that is not slow should take seconds; this only stops one that hangs
SLOW_TIMEOUT_S = 900
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    number: int  # 1-based among the page's bash/python blocks
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the marker line's reason
    slow: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.number}"


@dataclass(frozen=True)
class Fence:
    page: str
    line: int
    lang: str
    code: str
    above: str  # the line directly above the opening fence, stripped


def doc_pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    pages = sorted(f"docs/{n}" for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md", *pages]


def read_fences(page: str) -> list[Fence]:
    """Every fenced block of a markdown page (CommonMark: a closing fence repeats the opening character at least
    as many times)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().splitlines()
    fences, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marker, lang = m.group(1), m.group(2).lower()
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        close = re.compile(r"^ {0,3}" + re.escape(marker[0]) + "{" + str(len(marker)) + r",}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1:j]]
        above = lines[i - 1].strip() if i > 0 else ""
        fences.append(Fence(page, i + 1, lang, "\n".join(body) + "\n", above))
        i = j + 1
    return fences


def read_blocks(page: str) -> list[Block]:
    blocks = []
    for fence in read_fences(page):
        if fence.lang not in RUN_LANGS:
            continue
        not_run = fence.above[len(NOT_RUN):].strip() if fence.above.startswith(NOT_RUN) else None
        slow = fence.above[len(SLOW):].strip() if fence.above.startswith(SLOW) else None
        blocks.append(Block(page, len(blocks) + 1, fence.line, fence.lang, fence.code, not_run, slow))
    return blocks


ALL_BLOCKS = [b for page in doc_pages() for b in read_blocks(page)]


def missing_requirement(block: Block) -> str | None:
    """What this machine lacks for a block, as a skip reason: MLX (not installable everywhere) or Node."""
    if re.search(r"\bmlx\b|hnet-mlx|mlx_lm", block.code) and importlib.util.find_spec("mlx") is None:
        return "MLX is not installed"
    if re.search(r"(^|[\s;&|(])node\s", block.code, re.M) or "--web" in block.code:
        if shutil.which("node") is None:
            return "node is not installed"
        if not os.path.isdir(os.path.join(ROOT, "export", "js", "node_modules")):
            return "export/js/node_modules is missing (ONNXRUNTIME_NODE_INSTALL=skip npm ci in export/js)"
    return None


def make_scratch_dir(path: str) -> str:
    """A directory that looks like the repository root (links to its entries) but takes the files blocks write."""
    for name in os.listdir(ROOT):
        if name != ".git":
            os.symlink(os.path.join(ROOT, name), os.path.join(path, name))
    return path


def script_dirs() -> list[str]:
    """Where this interpreter's commands live: its own bin, and the bin beside every site-packages it reads (a
    virtualenv that borrows another one's packages through a .pth file finds their commands, mlx_lm.generate, there)."""
    dirs = [os.path.dirname(sys.executable)]
    for entry in sys.path:
        if entry.endswith("site-packages"):
            prefix = os.path.dirname(os.path.dirname(os.path.dirname(entry)))  # PREFIX/lib/pythonX.Y/site-packages
            bin_dir = os.path.join(prefix, "Scripts" if os.name == "nt" else "bin")
            if os.path.isdir(bin_dir) and bin_dir not in dirs:
                dirs.append(bin_dir)
    return dirs


def run_block(block: Block, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*script_dirs(), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"  # examples never download
    env["PYTHONUNBUFFERED"] = "1"
    if block.lang == "bash":
        argv, stdin = ["bash", "-euo", "pipefail", "-c", block.code], None
    else:
        argv, stdin = [sys.executable, "-"], block.code
    timeout = SLOW_TIMEOUT_S if block.slow else TIMEOUT_S
    # A session of its own, so a timeout ends the block's children (a server it started) too.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, start_new_session=True,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test_docs: killed after {timeout} s]"
        return subprocess.CompletedProcess(argv, -9, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def failure_message(block: Block, result: subprocess.CompletedProcess) -> str:
    return (f"{block.name} (line {block.line}, {block.lang}) exited with {result.returncode}\n"
            f"--- block ---\n{block.code}--- stdout (end) ---\n{result.stdout[-3000:]}\n"
            f"--- stderr (end) ---\n{result.stderr[-3000:]}")


class PageRuns:
    """Each page's blocks run once, in order, per chain: not-slow blocks in one directory, and (for slow blocks)
    every runnable block in another, so a test selected alone still finds what the blocks above it wrote."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.dirs: dict[tuple[str, bool], str] = {}
        self.results: dict[tuple[str, bool, int], subprocess.CompletedProcess] = {}

    def run(self, block: Block) -> None:
        chain = bool(block.slow)
        key = (block.page, chain)
        if key not in self.dirs:
            stem = re.sub(r"\W", "_", block.page) + ("_slow" if chain else "")
            self.dirs[key] = make_scratch_dir(str(self.tmp_path_factory.mktemp(stem)))
        before = [b for b in ALL_BLOCKS if b.page == block.page and b.number < block.number
                  and b.not_run is None and (chain or not b.slow)]
        for earlier in before:
            reason = missing_requirement(earlier)
            if reason:
                pytest.skip(f"{earlier.name}, which runs before it, cannot run: {reason}")
            result = self.result(earlier, chain)
            if result.returncode != 0:
                pytest.fail("an earlier block of the page failed:\n" + failure_message(earlier, result))
        result = self.result(block, chain)
        if result.returncode != 0:
            pytest.fail(failure_message(block, result))

    def result(self, block: Block, chain: bool) -> subprocess.CompletedProcess:
        key = (block.page, chain, block.number)
        if key not in self.results:
            self.results[key] = run_block(block, self.dirs[(block.page, chain)])
        return self.results[key]


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory) -> PageRuns:
    return PageRuns(tmp_path_factory)


def block_params():
    grouped = importlib.util.find_spec("xdist") is not None
    for b in ALL_BLOCKS:
        # Under pytest-xdist's --dist loadgroup a page stays on one worker, which then runs its chain once.
        marks = [pytest.mark.xdist_group(b.page)] if grouped else []
        if b.not_run is not None:
            marks.append(pytest.mark.skip(reason=f"{NOT_RUN} {b.not_run}"))
        elif b.slow is not None:
            marks.append(pytest.mark.slow)
        yield pytest.param(b, id=b.name, marks=marks)


@pytest.mark.parametrize("block", list(block_params()))
def test_docs_example_runs(block: Block, page_runs: PageRuns):
    reason = missing_requirement(block)
    if reason:
        pytest.skip(reason)
    page_runs.run(block)


def convention_problems(page: str) -> list[str]:
    problems = []
    fences = read_fences(page)
    for fence in fences:
        where = f"{page}:{fence.line}"
        if fence.lang in RUNNABLE_ALIASES:
            label = f"labelled {fence.lang!r}" if fence.lang else "with no label"
            problems.append(f"{where}: a fence {label}; label commands bash or python (run by the tests) "
                            "and output text")
        for marker in (NOT_RUN, SLOW):
            if fence.above.startswith(marker):
                if fence.lang not in RUN_LANGS:
                    problems.append(f"{where}: '{marker}' above a {fence.lang} fence, which is never run")
                if not fence.above[len(marker):].strip():
                    problems.append(f"{where}: '{marker}' without a reason")
    marked = {f.line - 1 for f in fences}  # lines (1-based) directly above a fence
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        for n, line in enumerate(f.read().splitlines(), start=1):
            if line.strip().startswith((NOT_RUN, SLOW)) and n not in marked:
                problems.append(f"{page}:{n}: a marker line that is not directly above a fence")
    return problems


def test_docs_follow_the_example_conventions():
    problems = [p for page in doc_pages() for p in convention_problems(page)]
    assert not problems, "\n".join(problems)


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", text, flags=re.M | re.S)  # no headings in code
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def broken_links(page: str) -> list[str]:
    problems = []
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            problems.append(f"{page}: link to {target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in heading_anchors(full):
            problems.append(f"{page}: link to {target}: no such heading")
    return problems


def test_docs_links_point_at_existing_files_and_headings():
    problems = [p for page in doc_pages() for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_unlabelled_fences_stray_markers_and_dead_links(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("# A, b: c\n````bash\n```\n# not a heading\n````\n")
    (tmp_path / "README.md").write_text(
        "[x](docs/x.md#a-b-c) [y](docs/x.md#not-a-heading) [z](docs/gone.md)\n\n"
        "```\nunlabelled\n```\n\nNot run by the tests:\n```bash\nexit 1\n```\n\n"
        "Slow: a blank line follows\n\n```python\nprint(1)\n```\n\nNot run by the tests: why\n```text\nout\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert [b.code for b in read_blocks("docs/x.md")] == ["```\n# not a heading\n"]  # a longer fence nests
    assert convention_problems("README.md") == [
        "README.md:3: a fence with no label; label commands bash or python (run by the tests) and output text",
        "README.md:8: 'Not run by the tests:' without a reason",
        "README.md:19: 'Not run by the tests:' above a text fence, which is never run",
        "README.md:12: a marker line that is not directly above a fence",
    ]
    assert broken_links("README.md") == [
        "README.md: link to docs/x.md#not-a-heading: no such heading",
        "README.md: link to docs/gone.md: no such file",
    ]
