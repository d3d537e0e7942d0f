"""Plugin discovery and the name registry.

Discovery is lazy: nothing is imported until a name is first resolved or listed.
Entry points of the group `banax` are loaded one at a time, so that a plugin that
fails to import costs a warning, not the other plugins.
"""

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from ._adjoint import AbstractAdjoint
from ._solver import AbstractSolver

ENTRY_POINT_GROUP = "banax"
DISABLE_AUTOLOAD_ENV = "BANAX_DISABLE_PLUGIN_AUTOLOAD"
#: banax's own plugins; they load even when autoload is disabled, like pytest's builtins.
FIRST_PARTY = frozenset({"banax-solvers", "banax-adjoints", "banax-reg"})
EXPLICIT = "(registered explicitly)"
KINDS = {
    "solver": "banax_solvers",
    "adjoint": "banax_adjoints",
    "regularizer": "banax_regularizers",
}


class BanaxPluginWarning(UserWarning):
    """A plugin could not be loaded or returned something unusable."""


class PluginError(Exception):
    """A plugin misbehaved: its hook raised or returned something malformed."""


class UnknownNameError(LookupError):
    """No solver/adjoint/regularizer is registered under the requested name."""


class UnknownAttributeError(UnknownNameError, AttributeError):
    """`banax.solver.<Name>` (or adjoint/regularization) names nothing registered."""


class PluginConflictError(PluginError, LookupError):
    """Two plugins claim the same name; neither is picked silently."""


@dataclasses.dataclass(frozen=True)
class Registration:
    """One registered name: what it is and which distribution provided it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to load, or whose hook result was rejected."""

    plugin: str
    distribution: str
    version: str
    error: str


def _canonical(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def autoload_enabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def _check_entry(kind: str, obj: Any) -> str | None:
    """Why `obj` cannot be registered as a `kind`, or None if it can."""
    if kind == "regularizer":
        return None if callable(obj) else f"{obj!r} is not callable"
    base, described = {
        "solver": (AbstractSolver, "banax.solver.Solver (or "
                   "banax.extend.AbstractSolveCombinator)"),
        "adjoint": (AbstractAdjoint, "banax.adjoint.Adjoint"),
    }[kind]
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return f"{obj!r} is not a subclass of {described}"
    return None


class Registry:
    """The plugin manager plus the name tables built from its hooks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next lookup rediscovers plugins (re-reading the
        autoload environment variable)."""
        self._pm: pluggy.PluginManager | None = None
        self._sources: dict[str, tuple[str, str]] = {}
        self._load_failures: list[PluginFailure] = []
        self._table: dict[str, dict[str, list[Registration]]] | None = None
        self._rejected: dict[str, dict[str, PluginError]] = {}
        self._hook_failures: list[PluginFailure] = []

    # -- discovery -----------------------------------------------------------------

    @property
    def manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            self._pm = pluggy.PluginManager(hookspecs.PROJECT)
            self._pm.add_hookspecs(hookspecs)
            self._load_entry_points()
        return self._pm

    def _load_entry_points(self) -> None:
        assert self._pm is not None
        autoload = autoload_enabled()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
            version = ep.dist.version if ep.dist is not None else ""
            if not autoload and _canonical(dist) not in FIRST_PARTY:
                continue
            plugin_name = f"{_canonical(dist)}:{ep.name}"
            if self._pm.has_plugin(plugin_name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
                if self._pm.is_registered(plugin):
                    continue
                self._pm.register(plugin, name=plugin_name)
            except Exception as error:  # noqa: BLE001 - any import error is contained
                self._fail(
                    self._load_failures, plugin_name, dist, version,
                    f"{type(error).__name__}: {error}", "failed to load",
                )
                continue
            self._sources[plugin_name] = (dist, version)

    def _fail(self, where: list, plugin: str, dist: str, version: str, error: str,
              what: str) -> None:
        where.append(PluginFailure(plugin, dist, version, error))
        warnings.warn(
            f"banax plugin {plugin!r} from distribution {dist} {version} {what}: "
            f"{error}. Other plugins are unaffected; run `banax plugins` for a summary.",
            BanaxPluginWarning,
            stacklevel=4,
        )

    def _build(self) -> dict[str, dict[str, list[Registration]]]:
        pm = self.manager
        table: dict[str, dict[str, list[Registration]]] = {kind: {} for kind in KINDS}
        rejected: dict[str, dict[str, PluginError]] = {kind: {} for kind in KINDS}
        self._hook_failures = []
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                plugin = impl.plugin_name
                dist, version = self._sources.get(plugin, (EXPLICIT, ""))
                where = f"hook {hook_name}() of plugin {plugin!r} (distribution {dist})"
                try:
                    provided = impl.function()
                except Exception as error:  # noqa: BLE001 - contained and reported
                    self._fail(self._hook_failures, plugin, dist, version,
                               f"{where} raised {type(error).__name__}: {error}", "is broken")
                    continue
                if not isinstance(provided, Mapping):
                    self._fail(
                        self._hook_failures, plugin, dist, version,
                        f"{where} returned {type(provided).__name__}, expected a dict "
                        f"from name to {kind}", "is broken",
                    )
                    continue
                for name, obj in provided.items():
                    problem = (
                        f"name {name!r} is not a non-empty string"
                        if not (isinstance(name, str) and name) else _check_entry(kind, obj)
                    )
                    if problem is not None:
                        message = f"{where} registered {kind} {name!r} wrongly: {problem}"
                        if isinstance(name, str):
                            rejected[kind][name] = PluginError(message)
                        self._fail(self._hook_failures, plugin, dist, version, message,
                                   "is broken")
                        continue
                    table[kind].setdefault(name, []).append(
                        Registration(kind, name, obj, plugin, dist, version)
                    )
        self._rejected = rejected
        return table

    @property
    def table(self) -> dict[str, dict[str, list[Registration]]]:
        if self._table is None:
            self._table = self._build()
        return self._table

    # -- explicit registration -----------------------------------------------------

    def register(self, plugin: Any, name: str | None = None) -> str:
        registered = self.manager.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"Plugin {name or plugin!r} is blocked from registering.")
        self._table = None
        return registered

    def unregister(self, plugin_or_name: Any) -> None:
        if isinstance(plugin_or_name, str):
            self.manager.unregister(name=plugin_or_name)
        else:
            self.manager.unregister(plugin_or_name)
        self._table = None

    # -- lookup ------------------------------------------------------------------------

    def resolve(self, kind: str, name: str) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"A {kind} name must be a string, got {type(name).__name__}.")
        registrations = self.table[kind].get(name)
        if not registrations:
            if name in self._rejected.get(kind, {}):
                raise self._rejected[kind][name]
            raise UnknownNameError(self._unknown_message(kind, repr(name)))
        return self._single(kind, name, registrations)

    def resolve_attribute(self, kind: str, module: str, attribute: str) -> Any:
        """`banax.solver.Picard` and friends: look a class up by its `__name__`."""
        matches = [
            r for regs in self.table[kind].values() for r in regs
            if getattr(r.obj, "__name__", None) == attribute
        ]
        if not matches:
            raise UnknownAttributeError(
                f"module {module!r} has no attribute {attribute!r}. "
                + self._unknown_message(kind, repr(attribute), attributes=True)
            )
        if len({id(r.obj) for r in matches}) > 1:
            self._single(kind, attribute, matches)
        return matches[0].obj

    def _single(self, kind: str, name: str, registrations: list[Registration]) -> Any:
        if len(registrations) > 1:
            claimants = "; ".join(
                f"distribution {r.distribution} {r.version} (plugin {r.plugin!r})"
                for r in registrations
            )
            raise PluginConflictError(
                f"The {kind} name {name!r} is claimed by more than one plugin: {claimants}. "
                "banax will not pick one silently: uninstall one of them, or disable "
                f"autoloading ({DISABLE_AUTOLOAD_ENV}=1) and register the one you want "
                "with banax.register_plugin()."
            )
        return registrations[0].obj

    def _unknown_message(self, kind: str, what: str, attributes: bool = False) -> str:
        regs = self.table[kind]
        if attributes:
            known = sorted({getattr(r.obj, "__name__", r.name) for v in regs.values() for r in v})
        else:
            known = sorted(regs)
        message = f"No {kind} {what} is registered. Registered {kind}s: " + (
            ", ".join(known) if known else "(none)"
        ) + "."
        if self.failures():
            message += " Some plugins failed to load; run `banax plugins` to see why."
        if not autoload_enabled():
            message += f" Plugin autoloading is disabled by {DISABLE_AUTOLOAD_ENV}."
        elif not known and kind in ("solver", "adjoint"):
            package = {"solver": "banax-solvers", "adjoint": "banax-adjoints"}[kind]
            message += f" Install {package} (or the meta-package banax)."
        return message

    def registrations(self, kind: str | None = None) -> list[Registration]:
        kinds = [kind] if kind is not None else list(KINDS)
        return [
            r for k in kinds for name in sorted(self.table[k]) for r in self.table[k][name]
        ]

    def failures(self) -> list[PluginFailure]:
        self.table  # noqa: B018 - hook failures are found while building the table
        return list(self._load_failures) + list(self._hook_failures)


REGISTRY = Registry()


def _construct(kind: str, name: str, cls: type, options: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"{kind} {name!r} ({cls.__name__}) has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(fields))}."
        )
    return cls(**options)


def get_solver(name: str, **options: Any) -> Any:
    """Instantiate the solver registered as `name` with `options`,
    e.g. `get_solver("anderson", depth=5, rtol=1e-6)`."""
    return _construct("solver", name, REGISTRY.resolve("solver", name), options)


def _as_component(kind: str, spec: Any, owner: str, option: str, strict: bool) -> Any:
    """A `kind` given as an instance, a registry name, or `{"name": ..., **options}`.

    Anything else is refused when `strict`, and otherwise returned as it is (e.g. a
    lineax solver for an adjoint's `b_solver`, which the adjoint validates); a dict
    without a name is refused either way.
    """
    base, seed_name, get, example = {
        "solver": (AbstractSolver, "banax.Solver", get_solver, "anderson"),
        "adjoint": (AbstractAdjoint, "banax.Adjoint", get_adjoint, "implicit"),
    }[kind]
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return get(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        options = dict(spec)
        return get(options.pop("name"), **options)
    if not strict and not isinstance(spec, Mapping):
        return spec
    raise TypeError(
        f"{owner}: {option} must be a {seed_name} instance, a registry name such as "
        f"{example!r}, or a dict {{'name': {example!r}, **options}}, which needs a "
        f"'name' key; got {spec!r}."
    )


def as_solver(spec: Any, *, owner: str, option: str = "solver") -> Any:
    """A solver given as an instance, a registry name such as `"anderson"`, or
    `{"name": "anderson", **options}` (built by `banax.get_solver`). `owner` and
    `option` name the argument in the error raised for anything else."""
    return _as_component("solver", spec, owner, option, strict=True)


def as_adjoint(spec: Any, *, owner: str, option: str = "adjoint") -> Any:
    """An adjoint given as an instance, a registry name such as `"implicit"`, or
    `{"name": "implicit", **options}` (built by `banax.get_adjoint`)."""
    return _as_component("adjoint", spec, owner, option, strict=True)


def get_adjoint(name: str, **options: Any) -> Any:
    """Instantiate the adjoint registered as `name`. Its `solver=` and `b_solver=`
    options may be solver instances, registry names, or `{"name": ..., **options}`."""
    cls = REGISTRY.resolve("adjoint", name)
    for option in ("solver", "b_solver"):
        if option in options:
            options[option] = _as_component(
                "solver", options[option], f"adjoint {name!r}", option, strict=False
            )
    return _construct("adjoint", name, cls, options)


def get_regularizer(name: str) -> Any:
    """The regularizer function registered as `name`."""
    return REGISTRY.resolve("regularizer", name)


def registrations(kind: str | None = None) -> list[Registration]:
    """Everything registered (of one `kind`: "solver", "adjoint" or "regularizer"),
    with the distribution and version that provided it."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or None, got {kind!r}.")
    return REGISTRY.registrations(kind)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to load or whose hooks were rejected."""
    return REGISTRY.failures()


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module explicitly (notebooks, tests, or with
    autoloading disabled). Returns the name it was registered under."""
    return REGISTRY.register(plugin, name)


def unregister_plugin(plugin_or_name: Any) -> None:
    """Undo `register_plugin`."""
    REGISTRY.unregister(plugin_or_name)
