"""The repository's static checks, run as tests so that CI (`uv run pytest`) runs them:
ruff (lint and import order) over every Python file, and basedpyright over the four
packages' sources, each configured in the root `pyproject.toml`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    """The tool installed beside this interpreter (the dev group), else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed; `uv sync` installs it with the dev group")
    return found


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1"})


def test_ruff_is_clean():
    done = _run(_tool("ruff"), "check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_basedpyright_is_clean():
    # The project named explicitly: a stray pyrightconfig.json in a parent folder would
    # otherwise win over this repository's pyproject.toml.
    done = _run(_tool("basedpyright"), "--project", str(ROOT), "--pythonpath", sys.executable)
    assert done.returncode == 0, done.stdout + done.stderr
