"""Option checks: what every solver and adjoint runs on its options at construction.

Options are plain fields holding Python scalars: `eqx.filter_jit` treats them as static
(compile-time) configuration and `eqx.tree_at` can edit them. Configurations loaded
through NumPy or YAML give NumPy scalars (`np.float32(0.5)`, `np.int64(50)`), which JAX
would treat as arrays and trace; `normalise_options` turns them into the equal Python
scalar, and the checks below accept them. JAX arrays are refused: an option decides
the shape of the computation, so it cannot be a traced value.

Each check raises with a message naming the owner, the option, the value and the
accepted range, e.g. `"Relaxed: damp must be a number in (0, 1], got 1.2."`; wrong
types raise `TypeError`, values out of range `ValueError`. Plugin authors call them
from `__check_init__`:

    def __check_init__(self):
        banax.extend.check_real(self, "anchor_scale", self.anchor_scale, low=0,
                                high=1, low_open=True)
"""

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import equinox as eqx
import jax
import numpy as np

# The annotations of option fields. A constructor accepts a Python scalar or the NumPy scalar
# a NumPy/YAML configuration gives, and that is what a run-time check of the annotations
# (jaxtyping's import hook, on in the test suite) reads; a constructed module holds the equal
# Python scalar (`normalise_options`), and that is what a static type checker reads, for the
# code that uses the option. (`float` includes `int`, as everywhere in typing.)
if TYPE_CHECKING:
    IntOption: TypeAlias = int
    RealOption: TypeAlias = float
    FlagOption: TypeAlias = bool
else:
    IntOption: TypeAlias = int | np.integer
    RealOption: TypeAlias = float | np.floating | np.integer
    FlagOption: TypeAlias = bool | np.bool_


def _owner(owner: Any) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def _scalar(value: Any) -> Any:
    """`value` as a Python scalar if it is a NumPy scalar (or 0-d NumPy array)."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _refuse_jax(owner: Any, option: str, value: Any, kind: str) -> None:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{_owner(owner)}: {option} must be a Python {kind}, got a JAX array "
            f"{value!r}. Options are compile-time configuration: pass a Python {kind} "
            f"(e.g. {kind}(x) outside jit)."
        )


def normalise_options(module: Any) -> None:
    """Replace every NumPy-scalar field of `module` by the equal Python scalar.

    Call it from `__check_init__`. It writes the fields the way Equinox applies field
    converters, so a solver or adjoint built from a NumPy/YAML configuration hashes,
    compares and compiles exactly like one built from Python numbers.
    """
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        scalar = _scalar(value)
        if scalar is not value:
            object.__setattr__(module, field.name, scalar)


def check_options(module: Any) -> None:
    """Run the construction checks of `module` again, and of the solvers and adjoints
    among its fields.

    `eqx.tree_at` builds a module without running `__check_init__`, so an option
    edited that way (`rtol=-1.0`, a NumPy scalar) would otherwise reach the solve
    unchecked. Adjoints call this when they are called (at trace time under `jit`).
    """
    for cls in type(module).__mro__:
        check = cls.__dict__.get("__check_init__")
        if check is not None:
            check(module)
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        if isinstance(value, eqx.Module):
            check_options(value)


def _interval(low: float | None, high: float | None, low_open: bool,
              high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low == 0 and high is None:
        return "a positive finite number" if low_open else "a non-negative finite number"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def _typed_scalar(owner: Any, option: str, value: Any, kind: type, requirement: str,
                  why: str) -> Any:
    """`value` as a Python/NumPy scalar of `kind` (not a bool), or a `TypeError` saying
    what the option must be."""
    _refuse_jax(owner, option, value, "float" if kind is numbers.Real else "int")
    scalar = _scalar(value)
    if isinstance(scalar, bool) or not isinstance(scalar, kind):
        hint = " (a bool)" if isinstance(scalar, bool) else ""
        raise TypeError(
            f"{_owner(owner)}: {option} must be {requirement}, got {value!r}{hint}{why}."
        )
    return scalar


def check_real(
    owner: Any,
    option: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    why: str = "",
) -> float | None:
    """Check that `value` is a finite real number in the given interval (or None when
    `allow_none`) and return it as a Python float (or None).

    `owner` is the module (its class names the error) or a name; `why` is appended to
    the message (e.g. `"; the reversible step divides by 1 - damp"`). Booleans, strings,
    NaN, infinities and JAX arrays are refused.
    """
    if value is None and allow_none:
        return None
    requirement = _interval(low, high, low_open, high_open) + (" or None" if allow_none else "")
    number = float(_typed_scalar(owner, option, value, numbers.Real, requirement, why))
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{_owner(owner)}: {option} must be {requirement}, got {value!r}{why}.")
    return number


@overload
def check_integer(owner: Any, option: str, value: Any, *, minimum: int,
                  maximum: int | None = None, allow_none: Literal[False] = False,
                  why: str = "") -> int: ...
@overload
def check_integer(owner: Any, option: str, value: Any, *, minimum: int,
                  maximum: int | None = None, allow_none: bool = False,
                  why: str = "") -> int | None: ...
def check_integer(owner: Any, option: str, value: Any, *, minimum: int,
                  maximum: int | None = None, allow_none: bool = False,
                  why: str = "") -> int | None:
    """Check that `value` is an integer in `[minimum, maximum]` (a Python or NumPy int,
    not a bool or a float such as `2.0`) and return it as a Python int."""
    if value is None and allow_none:
        return None
    requirement = "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
    if allow_none:
        requirement = f"None or {requirement}"
    scalar = _typed_scalar(owner, option, value, numbers.Integral, requirement, why)
    if maximum is not None and scalar > maximum:
        requirement = f"{requirement} and <= {maximum}"
    if scalar < minimum or (maximum is not None and scalar > maximum):
        raise ValueError(f"{_owner(owner)}: {option} must be {requirement}, got {value!r}{why}.")
    return int(scalar)


def check_flag(owner: Any, option: str, value: Any) -> bool:
    """Check that `value` is True or False (a NumPy bool too, not 0/1 or a string)."""
    _refuse_jax(owner, option, value, "bool")
    scalar = _scalar(value)
    if not isinstance(scalar, bool):
        raise TypeError(f"{_owner(owner)}: {option} must be True or False, got {value!r}.")
    return scalar


def check_choice(owner: Any, option: str, value: Any, choices: Sequence[str]) -> str:
    """Check that `value` is one of the strings `choices`."""
    scalar = _scalar(value)
    if not (isinstance(scalar, str) and scalar in choices):
        raise ValueError(
            f"{_owner(owner)}: {option} must be one of {tuple(choices)}, got {value!r}."
        )
    return scalar
