"""The denoising energy of f around x* (Perschewski & Stober, 2025)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from banax import FSpec
from banax.extend import IntOption

from ._flat_map import FlatMap, check_key, check_n_steps, flat_map, sq_norms

_NAME = "denoising_energy"


def denoising_energy(
    f_spec: FSpec,
    x_star: Any,
    *,
    key: PRNGKeyArray,
    sigma: float | Float[ArrayLike, ""] = 0.1,
    n_steps: IntOption = 1,
    has_aux: bool = False,
    batch_axis: int | None = None,
) -> Float[Array, "*batch"]:
    """Estimate `E‖f(x* + ε) − x*‖² / d` with `ε ~ N(0, σ² I)` and `x*` held constant.

    It asks `f` to map a noisy copy of its fixed point back onto the fixed point: a
    derivative-free penalty on how much `f` amplifies perturbations. For small `σ`,
    `f(x* + ε) − x* ≈ r + J ε` with `r = f(x*) − x*` and `J = ∂f/∂x`, so the energy is
    `(‖r‖² + σ² ‖J‖²_F) / d`, exactly so for affine `f`; at a fixed point it is
    `σ²` times the Hutchinson quantity `‖J‖²_F / d`. The estimate averages `n_steps`
    independent noise draws. `d` is the number of entries of one sample in batch
    mode, of the whole state otherwise.

    Cost: `n_steps` evaluations of `f` (run as one vmapped call), and their VJP for
    gradients; no Jacobian products, so it suits `f` without efficient JVPs.

    **Arguments:**

    - `f_spec`: the map, in any `FSpec` form; gradients flow to its arrays.
    - `x_star`: the state (any pytree of real floating-point arrays).
    - `key`: a PRNG key for the noise; required.
    - `sigma`: the noise standard deviation (>= 0; a JAX scalar may be traced, e.g.
        for a schedule).
    - `n_steps`: number of noise draws (Python int >= 1).
    - `has_aux`: `f` returns `(fx, f_aux)`; `f_aux` is ignored.
    - `batch_axis`: if given, the result has shape `(batch,)`, one estimate per
        sample. Otherwise a scalar over the whole state, which for a per-sample `f` is
        the mean of the per-sample estimates.

    A poor choice away from a fixed point (the residual `‖r‖²/d` then dominates), or
    when `σ` is large compared with the region where `f` is close to linear.
    """
    check_key(key, _NAME)
    n_steps = check_n_steps(n_steps, _NAME, "number of noise draws")
    _check_sigma(sigma)
    fmap = flat_map(f_spec, x_star, has_aux=has_aux, batch_axis=batch_axis, name=_NAME)
    noise = jax.random.normal(key, (n_steps, *fmap.z.shape), fmap.z.dtype)
    return _denoising(fmap, noise, jnp.asarray(sigma))


def _check_sigma(sigma: Any) -> None:
    problem = f"must be a scalar, got shape {jnp.shape(sigma)}" if jnp.shape(sigma) else None
    if problem is None and not isinstance(sigma, Tracer):  # traced: unchecked
        value = np.asarray(sigma)
        if not (np.isfinite(value) and value >= 0):
            problem = f"must be finite and >= 0, got {sigma!r}"
    if problem is not None:
        raise ValueError(f"{_NAME}: sigma, the noise standard deviation, {problem}.")


@eqx.filter_jit
def _denoising(fmap: FlatMap, noise: Float[Array, "draws batch features"],
               sigma: Float[Array, ""]) -> Array:
    z = jnp.broadcast_to(fmap.z, noise.shape)
    denoised = jax.vmap(fmap)(z + sigma.astype(z.dtype) * noise)
    return fmap.output(jnp.mean(sq_norms(denoised - z), axis=0) / fmap.features)
