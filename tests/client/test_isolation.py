"""The client stands alone: importing it loads nothing of the server, and it depends on
httpx and numpy only (pandas/pyarrow and tqdm as extras)."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
FORBIDDEN = ("torch", "celery", "sqlalchemy", "service", "store", "workers", "models",
             "ingest", "migrations", "fastapi", "pandas", "pyarrow", "matplotlib")


def test_import_loads_nothing_of_the_server():
    code = ("import sys, json, latentbank_client\n"
            "from latentbank_client import Client, AsyncClient\n"
            "Client(url='http://127.0.0.1:9', key='k').close()\n"
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(CLIENT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=CLIENT, timeout=60, check=True)
    loaded = set(json.loads(out.stdout))
    assert "latentbank_client" in loaded
    leaked = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert leaked == []


def test_dependencies_are_httpx_and_numpy_only():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "latentbank-client"

    def names(specs):
        return sorted(s.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                      for s in specs)

    assert names(project["dependencies"]) == ["httpx", "numpy"]
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert extras == {"pandas": ["pandas", "pyarrow"], "progress": ["tqdm"]}


def test_the_source_never_imports_the_server():
    for path in (CLIENT / "src" / "latentbank_client").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in FORBIDDEN[:9], f"{path.name}: {line}"
