"""Every `pip install` line of README.md works as written in a fresh environment."""

import shutil
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement

from core.installs import (
    ROOT,
    SELECTIVE_LINE,
    fresh_venv,
    pip_install,
    readme_install_lines,
    requirements,
)

LINES = readme_install_lines()
# The selective line is installed and checked by test_selective_install.py.
WHOLE_LINES = [line for line in LINES if line != SELECTIVE_LINE]

FULL = """
import banax, jax.numpy as jnp
dists = {r.distribution for r in banax.registrations()}
assert dists == {"banax-solvers", "banax-adjoints", "banax-reg"}, dists
for name in ("picard", "relaxed", "reversible", "broyden", "anderson"):
    banax.get_solver(name)
banax.get_regularizer("hutchinson_jacobian_frobenius")
adjoint = banax.get_adjoint("implicit", solver="anderson", b_solver="anderson")
sol = adjoint(lambda z: 0.5 * z + 1.0, jnp.zeros(3))
assert jnp.allclose(sol.value, 2.0, rtol=1e-4), sol.value
"""


def demo_requirements() -> list[str]:
    """The distributions of the meta-package's `demo` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(req).name for req in project["optional-dependencies"]["demo"]]


def test_readme_has_the_whole_demo_and_selective_install_lines():
    assert SELECTIVE_LINE in LINES, LINES
    assert [line for line in WHOLE_LINES if "./[demo]" in requirements(line)], LINES
    assert len(WHOLE_LINES) == 2, LINES


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build a fresh venv")
@pytest.mark.parametrize("line", WHOLE_LINES)
def test_install_line_works_in_a_fresh_venv(line, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    run = pip_install(python, *requirements(line))
    assert run.returncode == 0, f"{line!r} failed:\n{run.stderr}"
    check = FULL
    if "./[demo]" in requirements(line):  # every demo dependency is installed
        check += (f"import importlib.metadata as m\n"
                  f"for name in {demo_requirements()!r}: m.version(name)\n")
    subprocess.run([str(python), "-c", check], check=True, timeout=300)
    assert (python.parent / "banax").is_file()  # the command-line entry point


def test_install_lines_of_the_docs_are_readme_lines():
    # Only README's lines are installed for real above; the docs may repeat them.
    for page in sorted((ROOT / "docs").glob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("pip install") and "./" in line:
                assert line in LINES, f"{page.name}: {line!r} is not an install line of README"
