"""Jacobian regularizers, resolved from the registry on attribute access.

`jacobian_spectral_norm`, `denoising_energy` and `hutchinson_jacobian_frobenius`
come from the `banax-reg` plugin; every regularizer takes an `FSpec` and a state.
"""

from typing import TYPE_CHECKING, Any

from ._registry import REGISTRY, registrations

if TYPE_CHECKING:
    from banax_reg import (
        denoising_energy,
        hutchinson_jacobian_frobenius,
        jacobian_spectral_norm,
    )

__all__ = ["denoising_energy", "hutchinson_jacobian_frobenius", "jacobian_spectral_norm"]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return REGISTRY.resolve_attribute("regularizer", __name__, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | {r.name for r in registrations("regularizer")})
