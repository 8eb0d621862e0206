"""The documentation site builds with `mkdocs build --strict` (a broken link or anchor, a
page missing from the nav, a generated reference that fails: each fails `make test`), and
the README stays short, starting with the two commands."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.stack  # mkdocs builds the whole site: a minute
def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [
               str(ROOT), str(ROOT / "clients" / "python" / "src"),
               os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "reference/cli/index.html", "reference/endpoints/index.html",
                 "reference/configuration/index.html", "reference/models-config/index.html",
                 "reference/client/index.html", "reference/openapi.json",
                 "tutorials/first-model-cli/index.html", "benchmarks/mnist/index.html"):
        assert (site / page).is_file(), page
    client = (site / "reference/client/index.html").read_text()
    assert 'id="latentbank_client.Model.score"' in client   # mkdocstrings rendered it
    # nothing is loaded from another origin: no web fonts, no CDN scripts or styles
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r'<(?:link|script)[^>]+(?:href|src)="https?://', text), page


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 170, len(lines)
    head = "\n".join(lines[:8])
    assert "make demo" in head and "make test" in head
    links = re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines))
    assert links, "the README links into the site"
    for link in links:
        assert (ROOT / link).exists(), link
