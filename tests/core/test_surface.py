"""The public surface by audience: `banax` for model builders, `banax.extend` for
plugin authors, `banax.internal` for plumbing; the lists the docs give, the names the
root used to hold, and plugins that use nothing private."""

import ast
import re
import warnings
from pathlib import Path

import pytest

import banax
import banax.adjoint
import banax.extend
import banax.internal
import banax.solver

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = {
    "banax-solvers": ROOT / "banax_solvers" / "src",
    "banax-adjoints": ROOT / "banax_adjoints" / "src",
    "banax-reg": ROOT / "banax_reg" / "src",
    "banax-example-plugin": ROOT / "examples" / "banax-example-plugin" / "src",
}
MOVED = {
    "BackwardRuleAdjoint": banax.extend.AbstractBackwardRuleAdjoint,
    "LinearSolveAdjoint": banax.extend.AbstractLinearSolveAdjoint,
    "InvertibleStep": banax.extend.InvertibleStep,
    "LowRankInverseJacobian": banax.extend.LowRankInverseJacobian,
    "BoundFunction": banax.extend.BoundFunction,
    "FlatSolution": banax.extend.FlatSolution,
    "Problem": banax.extend.Problem,
    "TracedFunction": banax.extend.TracedFunction,
    "bind": banax.extend.bind,
    "make_problem": banax.extend.make_problem,
    "solve": banax.extend.solve,
    "solve_flat": banax.extend.solve_flat,
    "check_choice": banax.extend.check_choice,
    "check_flag": banax.extend.check_flag,
    "check_integer": banax.extend.check_integer,
    "check_options": banax.extend.check_options,
    "check_real": banax.extend.check_real,
    "normalise_options": banax.extend.normalise_options,
    "residual_norms": banax.extend.residual_norms,
    "squared_norms": banax.extend.squared_norms,
    "working_dtype": banax.extend.working_dtype,
    "stats_dtype": banax.extend.stats_dtype,
    "iterate": banax.internal.iterate,
    "Layout": banax.internal.Layout,
}


def _documented(heading: str) -> list[str]:
    """The backticked names of the paragraph after the line naming `heading`."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    start = text.index(f"`{heading}`")
    paragraph = text[text.index("\n\n", start) + 2:].split("\n\n")[0]
    return re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", paragraph)


@pytest.mark.parametrize("module, heading", [
    (banax, "banax.__all__"), (banax.extend, "banax.extend.__all__"),
])
def test_all_is_what_the_docs_list(module, heading):
    documented = _documented(heading)
    assert len(documented) == len(set(documented)), "a name is listed twice"
    assert len(module.__all__) == len(set(module.__all__)), "a name is exported twice"
    assert set(documented) == set(module.__all__)


@pytest.mark.parametrize("module", [banax, banax.extend, banax.internal])
def test_every_exported_name_resolves_without_a_warning(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_no_name_is_exported_by_two_audiences():
    assert not set(banax.extend.__all__) & set(banax.internal.__all__)
    # `hookimpl` is what both a model builder's test and a plugin register with.
    assert set(banax.__all__) & set(banax.extend.__all__) == {"hookimpl"}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_root_names_still_resolve_with_a_deprecation(name):
    home = "internal" if name in ("iterate", "Layout") else "extend"
    with pytest.warns(DeprecationWarning, match=rf"banax\.{name} has moved: use banax\.{home}\."):
        obj = getattr(banax, name)
    assert obj is MOVED[name]
    assert name not in banax.__all__ and name not in dir(banax)


def test_unknown_root_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'banax' has no attribute 'nonsense'"):
        banax.nonsense  # noqa: B018


def test_seed_names_are_the_abstract_bases():
    extend = banax.extend
    assert banax.solver.Solver is banax.Solver is extend.AbstractIterativeSolver
    assert banax.adjoint.Adjoint is banax.Adjoint is extend.AbstractAdjoint
    assert banax.adjoint.BackwardRuleAdjoint is extend.AbstractBackwardRuleAdjoint
    assert banax.adjoint.LinearSolveAdjoint is extend.AbstractLinearSolveAdjoint
    assert banax.adjoint.solve is extend.solve
    assert banax.solver.InvertibleStep is extend.InvertibleStep
    for kind in (extend.AbstractIterativeSolver, extend.AbstractSolveCombinator):
        assert issubclass(kind, extend.AbstractSolver)
    assert issubclass(extend.AbstractLinearSolveAdjoint, extend.AbstractBackwardRuleAdjoint)
    assert issubclass(extend.AbstractBackwardRuleAdjoint, extend.AbstractAdjoint)


@pytest.mark.parametrize("base", [
    "AbstractIterativeSolver", "AbstractSolveCombinator", "AbstractAdjoint",
    "AbstractBackwardRuleAdjoint", "AbstractLinearSolveAdjoint",
])
def test_abstract_bases_cannot_be_instantiated(base):
    cls = getattr(banax.extend, base)
    kwargs = {"solver": banax.get_solver("picard")} if "Adjoint" in base else {}
    with pytest.raises(TypeError, match="abstract"):
        cls(**kwargs)


def _imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """`(line, module, name)` of every import in `path`, and `(line, "banax", attr)` of
    every `banax.attr` read."""
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "banax"):
            found.append((node.lineno, "banax", node.attr))
    return found


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_plugins_use_only_public_names(plugin):
    """The built-in plugins and the example plugin reach banax as any plugin would:
    `banax.extend` and the root's public names, never a private module, the internal
    namespace or a name the root keeps only for old code."""
    files = sorted(PLUGINS[plugin].rglob("*.py"))
    assert files
    public = {
        "banax": set(banax.__all__), "banax.extend": set(banax.extend.__all__),
        "banax.solver": set(banax.solver.__all__),
        "banax.adjoint": set(banax.adjoint.__all__),
    }
    bad = []
    for path in files:
        for line, module, name in _imports_of(path):
            if module != "banax" and not module.startswith("banax."):
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if module not in public:
                bad.append(f"{where} imports {module}")
            elif name is not None and name not in public[module]:
                bad.append(f"{where} uses {module}.{name}")
    assert not bad, "\n".join(bad)
