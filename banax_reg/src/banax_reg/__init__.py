"""banax-reg: Jacobian regularizers for deep equilibrium models.

Each takes an `FSpec` and a state `x*` (usually a fixed point) and returns a
differentiable penalty to add to a training loss. They are registered with banax
under their function names, so `banax.regularization.<name>` and
`banax.get_regularizer("<name>")` find them.
"""

from .denoising import denoising_energy
from .hutchinson import hutchinson_jacobian_frobenius
from .spectral import jacobian_spectral_norm

__all__ = ["denoising_energy", "hutchinson_jacobian_frobenius", "jacobian_spectral_norm"]
