"""The spectral norm of the Jacobian of f at x*, by power iteration."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from banax import FSpec
from banax.extend import IntOption

from ._flat_map import Flat, FlatMap, check_key, check_n_steps, flat_map, norms

_NAME = "jacobian_spectral_norm"


def jacobian_spectral_norm(
    f_spec: FSpec,
    x_star: Any,
    *,
    key: PRNGKeyArray,
    n_steps: IntOption = 10,
    has_aux: bool = False,
    batch_axis: int | None = None,
) -> Float[Array, "*batch"]:
    """Estimate `σ_max(J)`, the largest singular value of `J = ∂f/∂x` at `x*`.

    Power iteration on `JᵀJ`: from a random unit vector `v₀`,
    `v_{k+1} = JᵀJ v_k / ‖JᵀJ v_k‖`, and the estimate is `‖J v_n‖`. It never
    overestimates `σ_max`; `v_n` converges to the top right singular vector like
    `(σ₂/σ₁)^{2n}`, the estimate like the square of that. `v_n` is treated as a
    constant, so the gradient with respect to the parameters of `f` is that of
    `‖J v_n‖`, i.e. `uᵀ (∂J/∂θ) v` with `u = J v / ‖J v‖`: the exact gradient of
    `σ_max` once the iteration has converged. `x*` is held constant.

    Cost: one linearisation of `f` (one evaluation), `n_steps` JVP + VJP pairs without
    gradient tracking, then one differentiable evaluation + JVP. For an `f` without
    forward mode (a `jax.custom_vjp` inside, as in the `banax.nn` cells) the
    linearisation is a VJP and `J v` its transpose: the same iteration and estimate.

    **Arguments:**

    - `f_spec`: the map, in any `FSpec` form; gradients flow to its arrays.
    - `x_star`: the state (any pytree of real floating-point arrays), usually a fixed
        point returned by a solve.
    - `key`: a PRNG key for `v₀`; required.
    - `n_steps`: power-iteration steps (Python int >= 1).
    - `has_aux`: `f` returns `(fx, f_aux)`; `f_aux` is ignored.
    - `batch_axis`: if given, every leaf of `x_star` carries a batch axis there and the
        result has shape `(batch,)`: one spectral norm per sample (`f` must not mix
        samples). Otherwise a scalar: the spectral norm of the Jacobian of the whole
        state, which for a per-sample `f` is the largest over samples.

    A poor choice when the top singular values are nearly equal (slow convergence,
    underestimate) or when only an average contraction matters: the Hutchinson
    Frobenius estimate is cheaper per step.
    """
    check_key(key, _NAME)
    n_steps = check_n_steps(n_steps, _NAME, "power-iteration steps")
    fmap = flat_map(f_spec, x_star, has_aux=has_aux, batch_axis=batch_axis, name=_NAME)
    v0 = jax.random.normal(key, fmap.z.shape, fmap.z.dtype)
    return _spectral_norm(fmap, v0, n_steps)


def _normalize(w: Flat, fallback: Flat) -> Flat:
    n = norms(w)[:, None]
    # A zero JᵀJ v (v in the null space, or J = 0) keeps the previous unit vector.
    return jnp.where(n > 0, w / jnp.where(n > 0, n, 1), fallback)


@eqx.filter_jit
def _spectral_norm(fmap: FlatMap, v0: Flat, n_steps: int) -> Array:
    frozen = fmap.frozen()
    jvp, vjp = frozen.jvp(), frozen.vjp()

    def power_step(_: Any, v: Flat) -> Flat:
        return _normalize(vjp(jvp(v)), v)

    v = jax.lax.fori_loop(0, n_steps, power_step, _normalize(v0, v0))
    jv = fmap.jvp()(jax.lax.stop_gradient(v))
    return fmap.output(norms(jv))
