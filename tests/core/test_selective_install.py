"""`pip install ./banax_core ./banax_solvers` must give a working core and solvers
without the adjoints: the members install on their own."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CORE_ONLY = """
import banax
try:
    banax.get_solver("picard")
except banax.UnknownNameError as error:
    assert "Install banax-solvers" in str(error), error
else:
    raise AssertionError("picard resolved without banax-solvers installed")
"""

CORE_AND_SOLVERS = """
import jax.numpy as jnp
import banax
from banax.solver import Anderson

class Plain(banax.Adjoint):
    solver: banax.Solver
    def solve(self, problem):
        return banax.solve(self.solver, problem)

sol = Plain(Anderson(rtol=1e-6))((lambda x: 0.5 * x + 1.0), jnp.zeros(3))
assert sol.result == banax.Result.CONVERGED and jnp.allclose(sol.value, 2.0, rtol=1e-5)
names = {r.distribution for r in banax.registrations()}
assert names == {"banax-solvers"}, names
try:
    banax.get_adjoint("implicit")
except banax.UnknownNameError as error:
    assert "Install banax-adjoints" in str(error), error
else:
    raise AssertionError("an adjoint resolved without banax-adjoints installed")
"""


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build a fresh venv")
def test_core_alone_then_core_plus_solvers_install_and_work(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"

    def install(*members: str) -> None:
        subprocess.run(
            ["uv", "pip", "install", "--quiet", "--python", str(python),
             *(str(ROOT / m) for m in members)],
            check=True,
        )

    install("banax_core")
    subprocess.run([str(python), "-c", CORE_ONLY], check=True)
    install("banax_solvers")
    subprocess.run([str(python), "-c", CORE_AND_SOLVERS], check=True)
