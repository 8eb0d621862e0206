"""Every code block of the tutorials (docs/tutorials/*.md) runs against one real stack
(`latentbank up`), so a tutorial that breaks fails `make test`.

Per page, in order: ```python blocks run in one Python process (one namespace, as in a
notebook), ```sh / ```bash blocks with `bash -euo pipefail` (the shell variables a block
sets carry over to the next, as in one terminal), ```console blocks likewise (their `$ `
lines). Fences are found wherever Markdown puts them (list items, admonitions, details),
by a Markdown parser. Blocks run in a fresh folder with LATENTBANK_URL / LATENTBANK_API_KEY
(and LATENTBANK_DATA_DIR) naming the stack, and `latentbank` on the PATH; the pages of
DISCOVERY run with LATENTBANK_DATA_DIR only, so the client finds the stack as the tutorials
say it does (its data folder's stack.json and admin.key). A ```text block is output shown
to the reader. Any other block, or one that must not run here, carries a marker on a line
of its own before it, saying why:

    <!-- not-run: needs Docker; make compose-test runs this topology -->

A block without a marker that the runner cannot run fails the test, as does a tutorial
with no block run. `<!-- cwd: repo -->` before a block runs it in the repository root.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from tests.support import Up, clean_env, free_port, whole_stack

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted(p for p in (ROOT / "docs" / "tutorials").glob("*.md") if p.name != "index.md")
RUN = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh",
       "console": "console"}
SHOWN = {"text", "output"}
MARKER = re.compile(r"^<!--\s*(not-run|cwd)\s*:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*\{?\.?([\w+-]*)[^\n]*$")
BLOCK_TIMEOUT = 300
# pages run without LATENTBANK_URL / LATENTBANK_API_KEY: the documented discovery is tested
DISCOVERY = {"notebook.md"}


@dataclass
class Block:
    line: int       # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None = None   # the marker's reason
    cwd: str | None = None


def parse(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, wherever they are (top level, list items,
    block quotes, admonitions and details), with the markers just before each (blank lines
    between a marker and its fence allowed). Fences are found by a CommonMark parser
    (markdown-it-py), not by lines at column 0. Raises ValueError for an unclosed fence."""
    return _blocks(text, 0)


# The openers of Python-Markdown's indented containers (admonition `!!!`, details `???` and
# `???+`, pymdownx.tabbed `===`): CommonMark reads their indented content as an indented
# code block (or, without a blank line, as part of a paragraph). Blanked (line numbers
# kept), their content becomes an indented code block, which _blocks parses again.
CONTAINER = re.compile(r"^\s*(!!!|\?\?\?\+?|===)\s+\S")


def _blocks(text: str, offset: int) -> list[Block]:
    lines = text.split("\n")
    fenced = {n for t in MarkdownIt("commonmark").parse(text) if t.type == "fence"
              for n in range(*t.map)}   # a fence's own lines are code, never an opener
    source = "\n".join("" if CONTAINER.match(line) and n not in fenced else line
                        for n, line in enumerate(lines))
    blocks, markers = [], {}
    for token in MarkdownIt("commonmark").parse(source):
        if token.type == "html_block":
            marker = MARKER.match(token.content.strip())
            if marker:
                markers[marker.group(1)] = marker.group(2)
                continue
        if token.type == "fence":
            start, end = token.map
            closing = lines[end - 1].lstrip(" \t>") if end - 1 > start else ""
            if not (closing.startswith(token.markup)
                    and not closing.strip().strip(token.markup[0])):
                raise ValueError(f"line {offset + start + 1}: the fence is never closed")
            info = token.info.strip().lstrip("{").lstrip(".")
            lang = re.match(r"[\w+-]*", info).group(0).lower()
            blocks.append(Block(offset + start + 1, lang, token.content,
                                markers.get("not-run"), markers.get("cwd")))
        elif token.type == "code_block":
            blocks += _blocks(token.content, offset + token.map[0])
        if token.type in ("fence", "code_block", "html_block", "paragraph_open",
                          "heading_open", "hr", "table_open"):
            markers = {}   # a marker belongs to the block right after it
    return blocks


def unseen(text: str, blocks: list[Block]) -> list[str]:
    """Lines that look like the opening fence of a runnable block but that the parser did
    not read as one (inside raw HTML, say), so that the runner would skip them silently;
    a not-run marker on the line before (blank lines allowed) excuses one."""
    inside = set()
    for b in blocks:
        inside.update(range(b.line, b.line + b.code.count("\n") + 2))
    found, marked = [], False
    for number, line in enumerate(text.split("\n"), 1):
        fence = FENCE.match(line.strip().lstrip(">").strip())
        if fence and fence.group(2).lower() in RUN and number not in inside and not marked:
            found.append(f"line {number}: a ```{fence.group(2).lower()} fence the runner "
                         "does not see as a code block (raw HTML around it?); make it a "
                         "Markdown block or mark it <!-- not-run: why -->")
        marker = MARKER.match(line.strip())
        if marker or line.strip():
            marked = bool(marker and marker.group(1) == "not-run" and marker.group(2))
    return found


def problems(text: str) -> list[str]:
    """What keeps a page from being tested: blocks that cannot run and carry no marker,
    runnable fences the runner does not see, empty reasons, and no block to run at all."""
    blocks = parse(text)
    found = []
    for b in blocks:
        if b.not_run is not None and not b.not_run:
            found.append(f"line {b.line}: a not-run marker must say why")
        if b.not_run is None and b.lang not in RUN and b.lang not in SHOWN:
            found.append(f"line {b.line}: a ```{b.lang or '(no language)'} block cannot run "
                         "here; mark it <!-- not-run: why --> or make it runnable")
        if b.cwd not in (None, "repo"):
            found.append(f"line {b.line}: cwd must be 'repo', got {b.cwd!r}")
    found += unseen(text, blocks)
    if not [b for b in blocks if b.not_run is None and b.lang in RUN]:
        found.append("no block runs: a tutorial must have code that CI runs")
    return found


# The Python side: one process per page, fed block after block (a notebook's kernel). The
# blocks' own output goes to stderr (the log); stdout carries only the answers.
KERNEL = r"""
import json, sys, traceback
answers, sys.stdout = sys.stdout, sys.stderr
namespace = {"__name__": "__main__"}
for request in sys.stdin:
    block = json.loads(request)
    try:
        exec(compile(block["code"], block["name"], "exec"), namespace)
        answer = {"ok": True}
    except BaseException:
        answer = {"ok": False, "error": traceback.format_exc()}
    sys.stderr.flush()
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
"""

# Shell blocks: each runs in its own bash, loading the variables the page's earlier
# blocks set and saving its own for the next (as if typed into one terminal).
SHELL_PRELUDE = """__lb_before=$(compgen -v)
[ -f "$LB_TUTORIAL_STATE" ] && source "$LB_TUTORIAL_STATE"
"""
SHELL_TRAILER = """
__lb_new=$(comm -13 <(sort <<<"$__lb_before") <(compgen -v | sort) \\
  | grep -Ev '^(__lb_|BASH|_$|PIPESTATUS|FUNCNAME|LINENO|RANDOM|SRANDOM|SECONDS|EPOCH|OPT|COMP)' \\
  || true)
if [ -n "$__lb_new" ]; then declare -p $__lb_new > "$LB_TUTORIAL_STATE"; fi
"""


class Page:
    """Runs one tutorial's blocks in order in `workdir` against the stack in `env`."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], log: Path) -> None:
        self.name, self.workdir, self.env, self.log = name, workdir, env, log
        self.kernel = None
        self.ran = 0

    def python(self, block: Block, cwd: Path) -> None:
        if self.kernel is None:
            self.kernel = subprocess.Popen(
                [sys.executable, "-c", KERNEL], cwd=self.workdir, env=self.env, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=open(self.log, "a"))  # noqa: SIM115
        code = block.code if cwd == self.workdir else (
            f"import os as __lb_os\n__lb_here = __lb_os.getcwd()\n__lb_os.chdir({str(cwd)!r})\n"
            f"try:\n    exec({block.code!r})\nfinally:\n    __lb_os.chdir(__lb_here)\n")
        self.kernel.stdin.write(json.dumps(
            {"code": code, "name": f"{self.name}:{block.line}"}) + "\n")
        self.kernel.stdin.flush()
        answer = []
        reader = threading.Thread(target=lambda: answer.append(self.kernel.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(BLOCK_TIMEOUT)
        if not answer or not answer[0]:
            raise AssertionError(f"{self.name}, python block at line {block.line}: no answer "
                                 f"within {BLOCK_TIMEOUT} s (or the process died)\n"
                                 f"{self.tail()}")
        result = json.loads(answer[0])
        if not result["ok"]:
            raise AssertionError(f"{self.name}, python block at line {block.line} failed:\n"
                                 f"{result['error']}\n{self.tail()}")

    def shell(self, block: Block, cwd: Path) -> None:
        code = block.code
        if block.lang == "console":
            code = "\n".join(line[2:] for line in code.split("\n") if line.startswith("$ "))
        script = self.workdir / f".block-{block.line}.sh"
        script.write_text(SHELL_PRELUDE + code + SHELL_TRAILER)
        with open(self.log, "a") as log:
            log.write(f"--- {self.name}: shell block at line {block.line}\n")
            log.flush()
            done = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=cwd,
                                  env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=BLOCK_TIMEOUT)
        if done.returncode:
            raise AssertionError(f"{self.name}, shell block at line {block.line} exited "
                                 f"{done.returncode}:\n{block.code}\n{self.tail()}")

    def run(self, blocks: list[Block]) -> None:
        try:
            for block in blocks:
                if block.not_run is not None or block.lang not in RUN:
                    continue
                cwd = ROOT if block.cwd == "repo" else self.workdir
                (self.python if RUN[block.lang] == "python" else self.shell)(block, cwd)
                self.ran += 1
        finally:
            if self.kernel is not None:
                self.kernel.stdin.close()
                try:
                    self.kernel.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.kernel.kill()
                    self.kernel.wait()

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "--- its output (last lines):\n" + "\n".join(lines[-n:])


def block_env(up: Up, discover: bool = False) -> dict[str, str]:
    """A user's shell on the machine running the stack: the stack's URL and key (with
    `discover`, only LATENTBANK_DATA_DIR, the stack's data folder), this checkout's code,
    `latentbank` and `python` from this interpreter's environment."""
    paths = [str(ROOT), str(ROOT / "clients" / "python" / "src")]
    old = os.environ.get("PYTHONPATH")
    named = {} if discover else {"LATENTBANK_URL": up.url, "LATENTBANK_API_KEY": up.key}
    return clean_env(up.data_dir, **named,
                     PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                     PYTHONPATH=os.pathsep.join([*paths, *([old] if old else [])]),
                     MPLBACKEND="Agg")


# --- the runner's own rules (fast) ---------------------------------------------------------


def test_markers_and_languages_are_read():
    page = "\n".join([
        "# t", "```python", "x = 1", "```", "<!-- not-run: needs Docker -->", "",
        "```sh", "docker compose up", "```", "```yaml", "a: 1", "```", "<!-- cwd: repo -->",
        "```sh", "ls", "```", "text between", "```text", "output", "```"])
    blocks = parse(page)
    assert [(b.lang, b.not_run, b.cwd) for b in blocks] == [
        ("python", None, None), ("sh", "needs Docker", None), ("yaml", None, None),
        ("sh", None, "repo"), ("text", None, None)]
    assert problems(page) == [
        "line 10: a ```yaml block cannot run here; mark it <!-- not-run: why --> or make it "
        "runnable"]


def test_indented_blocks_are_found_and_run_dedented():
    """Fences in list items, admonitions and details are the page's code too (the old
    column-0 scan skipped them: neither run nor flagged)."""
    page = "\n".join([
        "# t",                                    # 1
        "1. First:",                              # 2
        "",                                       # 3
        "    ```python",                          # 4
        "    x = 1",                              # 5
        "    ```",                                # 6
        "",                                       # 7
        "- item",                                 # 8
        "  <!-- not-run: needs Docker -->",       # 9
        "  ```sh",                                # 10
        "  docker compose up",                    # 11
        "  ```",                                  # 12
        "",                                       # 13
        '!!! note "Inside an admonition"',        # 14
        "    Some text:",                         # 15
        "    ```python",                          # 16
        "    assert x == 1",                      # 17
        "        y = 2 if x else 3",              # 18
        "    ```",                                # 19
        "",                                       # 20
        "??? tip",                                # 21
        "",                                       # 22
        "    <!-- cwd: repo -->",                 # 23
        "    ```console",                         # 24
        "    $ ls",                               # 25
        "    ```",                                # 26
        "",                                       # 27
        "> ```bash",                              # 28
        "> echo quoted",                          # 29
        "> ```",                                  # 30
        ""])
    blocks = parse(page)
    assert [(b.line, b.lang, b.code, b.not_run, b.cwd) for b in blocks] == [
        (4, "python", "x = 1\n", None, None),
        (10, "sh", "docker compose up\n", "needs Docker", None),
        (16, "python", "assert x == 1\n    y = 2 if x else 3\n", None, None),
        (24, "console", "$ ls\n", None, "repo"),
        (28, "bash", "echo quoted\n", None, None)]
    assert problems(page) == []
    with pytest.raises(ValueError, match="line 3: the fence is never closed"):
        parse("!!! note\n\n    ```python\n    x = 1\n")
    # inside a fence, a line like a container's opener is code
    assert parse('```python\nprint("""\n=== a heading in a string\n""")\n```\n')[0].code == (
        'print("""\n=== a heading in a string\n""")\n')


def test_a_runnable_fence_the_parser_does_not_see_is_refused():
    page = "```python\nx = 1\n```\n<div markdown>\n```python\nhidden = 1\n```\n</div>\n"
    assert [b.line for b in parse(page)] == [1]
    assert problems(page) == [
        "line 5: a ```python fence the runner does not see as a code block (raw HTML around "
        "it?); make it a Markdown block or mark it <!-- not-run: why -->"]
    assert problems(page.replace("<div markdown>\n", "<div markdown>\n<!-- not-run: x -->\n")
                    ) == []
    # a fence shown inside a longer fence is that block's text, not a block
    assert problems("````text\n```python\nx = 1\n```\n````\n```sh\nls\n```\n") == []


def test_a_page_with_nothing_to_run_is_refused():
    assert problems("<!-- not-run: no -->\n```sh\nls\n```\n```text\nout\n```\n") == [
        "no block runs: a tutorial must have code that CI runs"]
    assert "a not-run marker must say why" in problems(
        "<!-- not-run: -->\n```sh\nls\n```\n```python\n1\n```\n")[0]
    with pytest.raises(ValueError, match="never closed"):
        parse("```python\nx = 1\n")


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_every_tutorial_block_can_be_run_or_says_why_not(page):
    assert problems(page.read_text()) == []


def test_discovery_pages_are_tutorials():
    assert DISCOVERY and DISCOVERY.issubset(p.name for p in TUTORIALS)


def test_the_tutorials_are_the_ones_in_the_nav():
    assert {p.stem for p in TUTORIALS} == {
        "first-model-cli", "notebook", "own-images", "anomaly-scoring", "sql",
        "production-compose"}
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"tutorials/{p.name}" in nav for p in TUTORIALS)


# --- the tutorials against a real stack ---------------------------------------------------


@pytest.fixture(scope="module")
@whole_stack
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tutorial-stack")
    up = Up(root / "data", free_port(), root / "up.log")
    yield up
    if up.proc.poll() is None:
        up.stop()


@pytest.mark.slow
@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(page, stack, tmp_path):
    assert problems(page.read_text()) == []
    blocks = parse(page.read_text())
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**block_env(stack, discover=page.name in DISCOVERY),
           "LB_TUTORIAL_STATE": str(tmp_path / "shell-state.sh")}
    if page.name in DISCOVERY:
        assert "LATENTBANK_URL" not in env and "LATENTBANK_API_KEY" not in env
        assert env["LATENTBANK_DATA_DIR"] == str(stack.data_dir)
    runner = Page(page.name, workdir, env, tmp_path / "blocks.log")
    started = time.monotonic()
    runner.run(blocks)
    assert runner.ran == len([b for b in blocks if b.not_run is None and b.lang in RUN]) > 0
    print(f"{page.name}: {runner.ran} blocks in {time.monotonic() - started:.1f} s")
