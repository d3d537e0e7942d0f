"""Hutchinson's estimate of the scaled squared Frobenius norm of the Jacobian."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from banax import FSpec
from banax.extend import IntOption

from ._flat_map import FlatMap, check_key, check_n_steps, flat_map, sq_norms

_NAME = "hutchinson_jacobian_frobenius"


def hutchinson_jacobian_frobenius(
    f_spec: FSpec,
    x_star: Any,
    *,
    key: PRNGKeyArray,
    n_steps: IntOption = 1,
    has_aux: bool = False,
    batch_axis: int | None = None,
) -> Float[Array, "*batch"]:
    """Estimate `‖J‖²_F / d`, `J = ∂f/∂x` at `x*`, with Hutchinson's trace estimator.

    `‖J‖²_F = tr(JᵀJ) = E‖J ε‖²` for any probe with `E[ε εᵀ] = I`. The probes are
    Rademacher (independent ±1 entries), which has the smallest variance among such
    probes: `Var ‖J ε‖² = 2 (‖JᵀJ‖²_F − Σᵢ (JᵀJ)ᵢᵢ²)`, zero when `JᵀJ` is diagonal
    (e.g. `J` a scaled orthogonal matrix, where one probe is exact). The estimate is
    the mean of `‖J ε‖² / d` over `n_steps` probes; it is unbiased, and its gradient
    is an unbiased estimate of the gradient of `‖J‖²_F / d`. `x*` is held constant.
    `d` is the number of entries of one sample in batch mode, of the whole state
    otherwise.

    Cost: one evaluation of `f` and `n_steps` JVPs, run as one batched JVP (memory
    grows with `n_steps`); gradients add one VJP of that. For an `f` without forward
    mode (a `jax.custom_vjp` inside, as in the `banax.nn` cells) each `J ε` is the
    transpose of a VJP instead: the same estimate, from reverse mode.

    **Arguments:**

    - `f_spec`: the map, in any `FSpec` form; gradients flow to its arrays.
    - `x_star`: the state (any pytree of real floating-point arrays).
    - `key`: a PRNG key for the probes; required.
    - `n_steps`: number of probes (Python int >= 1). One probe per training step is
        the usual choice: the noise averages out over steps.
    - `has_aux`: `f` returns `(fx, f_aux)`; `f_aux` is ignored.
    - `batch_axis`: if given, the result has shape `(batch,)`, one estimate per
        sample. Otherwise a scalar over the whole state, which for a per-sample `f` is
        the mean of the per-sample estimates.

    A poor choice when the contraction must be certified: a small Frobenius norm
    bounds `σ_max` only by `‖J‖_F`; use `jacobian_spectral_norm` for that.
    """
    check_key(key, _NAME)
    n_steps = check_n_steps(n_steps, _NAME, "number of probes")
    fmap = flat_map(f_spec, x_star, has_aux=has_aux, batch_axis=batch_axis, name=_NAME)
    probes = jax.random.rademacher(key, (n_steps, *fmap.z.shape), fmap.z.dtype)
    return _hutchinson(fmap, probes)


@eqx.filter_jit
def _hutchinson(fmap: FlatMap, probes: Float[Array, "probes batch features"]) -> Array:
    # One linearisation, then only the probes are batched: f is evaluated once.
    jvps = jax.vmap(fmap.jvp())(probes)
    return fmap.output(jnp.mean(sq_norms(jvps), axis=0) / fmap.features)
