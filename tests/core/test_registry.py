"""The plugin registry: discovery, explicit registration, contained failures."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

import banax
from banax._registry import REGISTRY

HALPERN_CLONE = """
import banax
from banax_example_plugin import Halpern

class Halpern2(Halpern):
    pass

@banax.hookimpl
def banax_solvers():
    return {"halpern": Halpern2, "halpern2": Halpern2}
"""


def test_import_banax_loads_no_plugin():
    code = (
        "import sys, banax\n"
        "import banax.solver, banax.adjoint, banax.regularization, banax.utils\n"
        "loaded = [m for m in sys.modules if m.startswith('banax_')]\n"
        "assert not loaded, loaded\n"
        "from banax._registry import REGISTRY\n"
        "assert REGISTRY._pm is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_plugin_is_discovered_through_its_entry_point():
    solver = banax.get_solver("halpern", rtol=1e-6, max_steps=3000)
    from banax.solver import Halpern
    from banax_example_plugin import Halpern as Original

    assert Halpern is Original and type(solver) is Original
    reg = next(r for r in banax.registrations("solver") if r.name == "halpern")
    assert reg.distribution == "banax-example-plugin" and reg.version == "0.1.0"


def test_example_plugin_solves_a_nonexpansive_problem_picard_cannot():
    class Plain(banax.Adjoint):
        solver: banax.Solver

        def solve(self, problem):
            return banax.extend.solve(self.solver, problem)

    # A quarter-turn rotation plus a shift: nonexpansive, so plain iteration cycles
    # forever, but Halpern's anchored iteration converges to (I − R)⁻¹ c.
    rotation = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    c = jnp.array([1.0, -1.0])
    f_spec = (lambda x, r, c: r @ x + c, (rotation, c))
    expected = jnp.linalg.solve(jnp.eye(2) - rotation, c)
    sol = Plain(banax.get_solver("halpern", atol=1e-3, rtol=0.0, max_steps=5000))(
        f_spec, jnp.zeros(2)
    )
    assert sol.result == banax.Result.CONVERGED
    assert jnp.allclose(sol.value, expected, atol=2e-3)

    class Cycling(banax.Solver):
        def init(self, z0, fz0):
            return None

        def step(self, f, z, fz, state, trace):
            fz_next, trace = f(fz, trace)
            return fz, fz_next, state, trace

    picard = Plain(Cycling(atol=1e-3, rtol=0.0, max_steps=5000))(f_spec, jnp.zeros(2))
    assert picard.result == banax.Result.MAX_STEPS


def test_unknown_name_lists_registered_names():
    with pytest.raises(banax.UnknownNameError, match="halpern") as info:
        banax.get_solver("no-such-solver")
    assert isinstance(info.value, LookupError)
    assert "no-such-solver" in str(info.value)


def test_unknown_attribute_is_an_attribute_error_and_import_error():
    with pytest.raises(AttributeError, match="NoSuchSolver"):
        banax.solver.NoSuchSolver  # noqa: B018
    with pytest.raises(ImportError):
        from banax.solver import NoSuchSolver  # noqa: F401
    assert "Halpern" in dir(banax.solver)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="anchor_scale"):
        banax.get_solver("halpern", anchr_scale=0.5)


def test_invalid_option_fails_at_construction():
    with pytest.raises(ValueError, match="anchor_scale must be in"):
        banax.get_solver("halpern", anchor_scale=2.0)
    with pytest.raises(ValueError, match="rtol must be a non-negative"):
        banax.get_solver("halpern", rtol=-1.0)
    with pytest.raises(ValueError, match="loop_kind must be one of"):
        banax.get_solver("halpern", loop_kind="scan")
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        banax.get_solver("halpern", max_steps=0)


def test_broken_plugin_warns_with_its_distribution_and_others_still_work(fake_dists):
    fake_dists.add("broken-plugin", "broken_mod", "raise RuntimeError('kaboom at import')\n")
    with pytest.warns(banax.BanaxPluginWarning, match=r"broken-plugin.*kaboom at import"):
        solver = banax.get_solver("halpern")
    assert type(solver).__name__ == "Halpern"
    (failure,) = [f for f in banax.plugin_failures() if f.distribution == "broken-plugin"]
    assert "RuntimeError: kaboom at import" in failure.error


def test_clashing_plugins_error_names_both_only_for_the_clashing_name(fake_dists):
    fake_dists.add("clash-plugin", "clash_mod", HALPERN_CLONE, version="2.5")
    with pytest.raises(banax.PluginConflictError) as info:
        banax.get_solver("halpern")
    message = str(info.value)
    assert "banax-example-plugin" in message and "clash-plugin 2.5" in message
    # The other name of the clashing plugin is unaffected.
    assert type(banax.get_solver("halpern2")).__name__ == "Halpern2"


def test_malformed_hook_results_are_errors_naming_the_plugin(fake_dists):
    fake_dists.add("bad-result", "bad_result_mod", """
        import banax

        @banax.hookimpl
        def banax_solvers():
            return {"not_a_solver": 42}

        @banax.hookimpl
        def banax_adjoints():
            return ["not", "a", "dict"]
    """)
    with pytest.warns(banax.BanaxPluginWarning, match="bad-result"):
        REGISTRY.table  # noqa: B018
    with pytest.raises(
        banax.PluginError, match=r"bad-result.*not a subclass of banax.solver.Solver"
    ):
        banax.get_solver("not_a_solver")
    failures = [f.error for f in banax.plugin_failures() if f.distribution == "bad-result"]
    assert any("returned list, expected a dict" in e for e in failures)
    assert type(banax.get_solver("halpern")).__name__ == "Halpern"


def test_autoload_off_skips_third_party_plugins_but_explicit_registration_works(autoload_off):
    with pytest.raises(banax.UnknownNameError, match="BANAX_DISABLE_PLUGIN_AUTOLOAD"):
        banax.get_solver("halpern")
    import banax_example_plugin

    name = banax.register_plugin(banax_example_plugin)
    try:
        assert type(banax.get_solver("halpern")).__name__ == "Halpern"
        reg = next(r for r in banax.registrations("solver") if r.name == "halpern")
        assert reg.distribution == "(registered explicitly)"
    finally:
        banax.unregister_plugin(name)
    with pytest.raises(banax.UnknownNameError):
        banax.get_solver("halpern")


def test_get_adjoint_resolves_nested_solvers():
    class Holder(banax.Adjoint):
        solver: banax.Solver
        b_solver: banax.Solver

        def solve(self, problem):
            return banax.extend.solve(self.solver, problem)

    class Plugin:
        @banax.hookimpl
        def banax_adjoints(self):
            return {"holder": Holder}

    name = banax.register_plugin(Plugin(), name="holder-plugin")
    try:
        adjoint = banax.get_adjoint(
            "holder", solver="halpern", b_solver={"name": "halpern", "rtol": 1e-9}
        )
        assert adjoint.solver.rtol == 1e-5 and adjoint.b_solver.rtol == 1e-9
        with pytest.raises(TypeError, match="needs a 'name' key"):
            banax.get_adjoint("holder", solver={"rtol": 1.0}, b_solver="halpern")
        from banax.adjoint import Holder as Resolved

        assert Resolved is Holder
    finally:
        banax.unregister_plugin(name)


def test_registered_regularizer_is_resolved_by_name_and_attribute():
    def my_penalty(f_spec, x):
        return 0.0

    class Plugin:
        @banax.hookimpl
        def banax_regularizers(self):
            return {"my_penalty": my_penalty}

    name = banax.register_plugin(Plugin(), name="penalty-plugin")
    try:
        assert banax.get_regularizer("my_penalty") is my_penalty
        from banax.regularization import my_penalty as resolved

        assert resolved is my_penalty
    finally:
        banax.unregister_plugin(name)
