"""Docs are code: every ```python block of README.md and docs/**/*.md runs as written.

Each page runs in its own process (`run_page.py`, forked from a server that has imported
JAX and banax but started nothing), its blocks in order in one namespace, the way a
reader pastes them into a session: default JAX configuration (float32, none of the
suite's strict promotion modes), on the CPU, in an empty working directory. Each page is
its own test case, so pytest-xdist spreads pages over the cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from docs.run_page import python_blocks
from xla_flags import SUITE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("run_page.py")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A page is an example, not a benchmark: one that needs minutes has outgrown the docs.
PAGE_TIMEOUT_S = 240


def reader_env() -> dict[str, str]:
    """The environment of a user: the suite's JAX settings removed, except XLA's
    (`SUITE_XLA_FLAGS`: little optimisation, one thread per program), as in the rest of
    the suite."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "BANAX_")) and k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", XLA_FLAGS=" ".join(SUITE_XLA_FLAGS))
    return env


@pytest.fixture(scope="module")
def run_page(tmp_path_factory):
    """`run_page(page, cwd)`: the page's run by this worker's page server, or a line
    saying why there is none."""
    log = tmp_path_factory.mktemp("page_server") / "stderr"
    with log.open("w") as err:
        server = subprocess.Popen([sys.executable, str(RUNNER), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err, text=True,
                                  cwd=log.parent, env=reader_env())

    def run(page: Path, cwd: Path) -> dict | str:
        request = {"page": str(page), "cwd": str(cwd), "timeout": PAGE_TIMEOUT_S}
        try:
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            answer = server.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            return "the page server stopped:\n" + log.read_text()[-6000:]
        answer = json.loads(answer)
        if answer["returncode"] is None:
            return f"{page.name} did not finish within {PAGE_TIMEOUT_S} s"
        return answer

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(run_page, page, tmp_path):
    run = run_page(page, tmp_path)
    if isinstance(run, str):
        pytest.fail(run, pytrace=False)
    if run["returncode"] != 0:
        pytest.fail(run["stderr"][-6000:], pytrace=False)


def test_blocks_are_found_with_their_lines_and_indentation():
    text = "\n".join([
        "# Title",                  # 1
        "```python",                # 2
        "a = 1",                    # 3
        "```",                      # 4
        "```bash",                  # 5
        "pip install x",            # 6
        "```",                      # 7
        "- a list item:",           # 8
        "",                         # 9
        "  ```python",              # 10
        "  if a:",                  # 11
        "      b = 2",              # 12
        "  ```",                    # 13
        "```text",                  # 14
        "```python is not here",    # 15
        "```",                      # 16
    ])
    assert python_blocks(text) == [(3, "a = 1"), (11, "if a:\n    b = 2")]


def test_a_failing_block_names_the_page_and_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro.\n\n```python\nx = 1\n```\n\nThen:\n\n```python\ny = x\nz = w\n```\n")
    run = subprocess.run([sys.executable, str(RUNNER), str(page)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert f"{page}: the block at line 10 failed" in run.stderr
    assert f'File "{page}", line 11' in run.stderr  # the page's own line of `z = w`
    assert "NameError: name 'w' is not defined" in run.stderr


def test_a_warning_of_banax_fails_the_page_and_others_do_not(run_page, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport warnings\nimport banax\nwarnings.warn('not ours', UserWarning)\n```"
        "\n\n```python\nwarnings.warn('tolerance too fine', banax.BanaxPrecisionWarning)\n```\n"
    )
    run = run_page(page, tmp_path)
    assert run["returncode"] == 1
    assert "banax warned:\nthe block at line 8: BanaxPrecisionWarning: tolerance too fine" \
        in run["stderr"]
    assert "not ours" not in run["stderr"].split("banax warned:")[1]
