"""`pip install ./banax_core ./banax_solvers` (README's selective install) must give a
working core and solvers without the adjoints: the members install on their own."""

import shutil
import subprocess

import pytest

from core.installs import SELECTIVE_LINE, fresh_venv, pip_install, requirements

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
        return banax.extend.solve(self.solver, problem)

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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build a fresh venv")
def test_core_alone_then_core_plus_solvers_install_and_work(tmp_path):
    python = fresh_venv(tmp_path / "venv")

    def install(*members: str) -> None:
        run = pip_install(python, *members)
        assert run.returncode == 0, f"pip install {' '.join(members)} failed:\n{run.stderr}"

    install("./banax_core")
    subprocess.run([str(python), "-c", CORE_ONLY], check=True)
    install(*requirements(SELECTIVE_LINE))
    subprocess.run([str(python), "-c", CORE_AND_SOLVERS], check=True)
