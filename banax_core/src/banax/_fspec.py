"""The `FSpec` convention: how a function and its extra arguments are passed."""

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import equinox as eqx

FSpec: TypeAlias = (
    Callable[..., Any]
    | tuple[Callable[..., Any], Any]
    | tuple[Callable[..., Any], Any, Mapping[str, Any]]
)
"""A function `f(x, *args, **kwargs)` with its extra arguments.

One of: a bare callable `f`; `(f, args)`; or `(f, args, kwargs)`. In both tuple forms
`args` is the tuple of extra positional arguments, and anything that is not a tuple
(a list included) is ONE argument: `(f, [a, b])` calls `f(x, [a, b])`.
"""

_FORMS = (
    "f, (f, arg), (f, (arg1, arg2, ...)) or (f, (arg1, ...), {'name': value, ...})"
)


class BoundFunction(eqx.Module):
    """`x ↦ fn(x, *args, **kwargs)`, as a pytree.

    The arrays in `args`, `kwargs` and (when `fn` is an `eqx.Module`) inside `fn` are
    leaves of this module, so they are what gradients flow to.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, x: Any) -> Any:
        return self.fn(x, *self.args, **self.kwargs)


def bind(f_spec: FSpec) -> BoundFunction:
    """Normalise an `FSpec` into a `BoundFunction`.

    Raises `TypeError` naming the accepted forms when `f_spec` is malformed.
    """
    if isinstance(f_spec, BoundFunction):
        return f_spec
    if callable(f_spec) and not isinstance(f_spec, tuple):
        return BoundFunction(f_spec, (), {})
    if not isinstance(f_spec, tuple) or len(f_spec) not in (2, 3):
        raise TypeError(
            f"f_spec must be one of {_FORMS}; got {_describe(f_spec)}."
        )
    fn = f_spec[0]
    if not callable(fn):
        raise TypeError(
            f"The first element of f_spec must be callable, got {_describe(fn)}. "
            f"Accepted forms: {_FORMS}."
        )
    args = f_spec[1]
    if not isinstance(args, tuple):  # one argument, in both forms (a list included)
        args = (args,)
    kwargs: dict[str, Any] = {}
    if len(f_spec) == 3:
        if not isinstance(f_spec[2], Mapping):
            raise TypeError(
                "The third element of f_spec must be a dict of keyword arguments, got "
                f"{_describe(f_spec[2])}. Accepted forms: {_FORMS}."
            )
        kwargs = dict(f_spec[2])
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"f_spec keyword argument names must be strings, got {bad!r}.")
    return BoundFunction(fn, args, kwargs)


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple):
        return f"a tuple of length {len(obj)}"
    return f"an object of type {type(obj).__name__}"
