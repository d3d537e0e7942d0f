"""An estimate of the spectral radius of `∂f/∂z` at a point, for monitoring a DEQ."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._fspec import FSpec, bind
from ._layout import layout_of
from ._linearize import jvp_at
from ._numerics import squared_norms


def spectral_radius(
    f_spec: FSpec,
    z: Any,
    *,
    key: PRNGKeyArray,
    batch_axis: int | None = None,
    n_steps: int = 100,
) -> Float[Array, "*batch"]:
    """Estimate `ρ(J)`, the largest eigenvalue modulus of `J = ∂f/∂z` at `z` (per sample
    when `batch_axis` is given), by power iteration on `J` itself (torchdeq's
    `sradius`).

    With `v₀` random and `v_{k+1} = J v_k / ‖J v_k‖`, the growth factors `‖J v_k‖`
    tend to `ρ`; for a dominant complex pair they oscillate around it, so the estimate
    is their geometric mean over the second half of the `n_steps` iterations, after the
    first half has let the dominant eigenvectors take over. `ρ < 1` at `z*` means the
    fixed point is locally attracting for Picard iteration; `ρ` near or above 1 warns
    that the solve (and the implicit backward solve) will slow down or fail.

    `f` is linearised once at `z`; each step costs one JVP, or for a cell without
    forward-mode autodiff (a `jax.custom_vjp` inside, as in the `banax.nn` cells) one
    transposed VJP, the same product from reverse mode. `z` may be any pytree state
    (a tuple of feature maps for `banax.nn.MultiscaleCell`). The result is a monitoring
    value: no gradient flows through it. Accuracy is a few percent when the two largest
    eigenvalue moduli are close; raise `n_steps` for more.

    **Arguments:**

    - `f_spec`: the map, e.g. `deq.f_spec(x)` for a `banax.DEQ`.
    - `z`: the point, usually the fixed point `z*`.
    - `key`: a PRNG key for the starting vector.
    - `batch_axis`: the axis of `z` that indexes independent samples, or `None`.
    - `n_steps`: power-iteration steps, an int >= 2. Default 100.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"spectral_radius: n_steps must be an int >= 2, got {n_steps!r}.")
    f = bind(f_spec)
    layout = layout_of(z, batch_axis)
    z = jax.lax.stop_gradient(z)
    flat = layout.flatten(z)
    jvp = jvp_at(lambda flat: layout.flatten(f(layout.unflatten(flat))), flat)
    v = jax.random.normal(key, flat.shape, flat.dtype)

    def step(v: Array) -> tuple[Array, Array]:
        jv = jvp(v)
        growth = jnp.sqrt(squared_norms(jv) / squared_norms(v))
        scale = jnp.where(growth > 0, growth, 1).astype(jv.dtype)
        return jv / scale[:, None], growth

    warm = n_steps // 2
    v = jax.lax.fori_loop(0, warm, lambda _, v: step(v)[0], v)
    _, growth = jax.lax.scan(lambda v, _: step(v), v, length=n_steps - warm)
    rho = jnp.exp(jnp.mean(jnp.log(jnp.maximum(growth, jnp.finfo(growth.dtype).tiny)),
                           axis=0))
    rho = jax.lax.stop_gradient(rho)
    return rho if layout.batched else rho[0]
