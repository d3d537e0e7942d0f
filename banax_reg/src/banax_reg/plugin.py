"""Registers the regularizers of banax-reg with banax, through the public hook."""

from collections.abc import Callable

import banax

from . import denoising_energy, hutchinson_jacobian_frobenius, jacobian_spectral_norm


@banax.hookimpl
def banax_regularizers() -> dict[str, Callable[..., object]]:
    return {
        "jacobian_spectral_norm": jacobian_spectral_norm,
        "denoising_energy": denoising_energy,
        "hutchinson_jacobian_frobenius": hutchinson_jacobian_frobenius,
    }
