"""The contract between banax and its plugins: three hooks, one marker.

A plugin is a module (or object) with functions decorated by `banax.hookimpl`, named
after the hooks below, and registered in its distribution's metadata under the
entry-point group `banax`::

    [project.entry-points.banax]
    my_plugin = "my_plugin"

Each hook takes no arguments and returns a dict from registry name to object. A name
must be a non-empty string; the objects are solver classes (`banax.solver.Solver`
subclasses, or `banax.extend.AbstractSolveCombinator` ones), `banax.adjoint.Adjoint`
subclasses and callables respectively. Classes also appear as
attributes of `banax.solver` / `banax.adjoint` under their class name.
"""

import pluggy

PROJECT = "banax"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def banax_solvers() -> dict[str, type]:
    """Return the solvers this plugin provides, as `{name: SolverSubclass}`."""
    ...


@hookspec
def banax_adjoints() -> dict[str, type]:
    """Return the adjoints this plugin provides, as `{name: AdjointSubclass}`."""
    ...


@hookspec
def banax_regularizers() -> dict[str, object]:
    """Return the regularizers this plugin provides, as `{name: function}`."""
    ...
