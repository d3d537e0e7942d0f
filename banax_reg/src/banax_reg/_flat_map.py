"""What every regularizer shares: `f` as a flat map around a constant state `x*`.

A call is validated exactly like a solve (the FSpec forms, `has_aux`, the output
structure, `batch_axis`), then the state is flattened into the `(B, N)` form that
solvers see: `B` samples of `N` entries each, `B = 1` outside batch mode. Reductions
over the last axis are therefore per-sample in batch mode and over the whole state
otherwise, so each regularizer is written once for both.

Each regularizer draws its random vectors before entering its compiled core, which is
then a deterministic function of them: eager calls of the same shapes share one
compiled sampler instead of compiling it into every core.

Jacobian products come from `FlatMap.jvp` and `FlatMap.vjp`: forward mode where `f` allows it, and
otherwise (a cell with a `jax.custom_vjp`, which forbids `jax.jvp`, such as the
`banax.nn` cells) reverse mode, with `J v` obtained as the transpose of the VJP. Both
give the same products, so every estimate is the same either way.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from banax import FSpec
from banax.extend import (
    IntOption,
    TracedFunction,
    calls_custom_vjp,
    key_shape,
    make_problem,
    working_dtype,
)

Flat = Float[Array, "batch features"]


class FlatMap(eqx.Module):
    """`z ↦ f(z)` on flat `(B, N)` arrays, computed around the constant state `z`.

    Arithmetic outside `f` (probes, norms, means) runs in `z.dtype`, which is at
    least float32 whatever the precision of the state; `f` itself runs in the
    dtypes of the state.
    """

    f: TracedFunction
    z: Flat
    batched: bool = eqx.field(static=True)
    forward_mode: bool = eqx.field(static=True)

    def __call__(self, z: Flat) -> Flat:
        return self.f.evaluate(z).astype(self.z.dtype)

    def jvp(self) -> Callable[[Flat], Flat]:
        """`v ↦ J v` at `z`: forward mode, or the transpose of a VJP without it."""
        if self.forward_mode:
            return jax.linearize(self, self.z)[1]

        def vjp(u: Flat) -> Flat:
            # Made inside the transposition, the pullback is transposed through the
            # custom_vjp rule; one made outside would be asked for a derivative of the
            # rule, which JAX does not have.
            return jax.vjp(self, self.z)[1](u)[0]

        transposed = jax.linear_transpose(vjp, self.z)
        return lambda v: transposed(v)[0]

    def vjp(self) -> Callable[[Flat], Flat]:
        """`u ↦ Jᵀ u` at `z`: the transpose of a linearisation, or a plain VJP."""
        if self.forward_mode:
            transposed = jax.linear_transpose(jax.linearize(self, self.z)[1], self.z)
        else:
            # Only built when used: an unused pullback of a custom_vjp leaves an
            # equation that an outer derivative cannot differentiate.
            transposed = jax.vjp(self, self.z)[1]
        return lambda u: transposed(u)[0]

    @property
    def features(self) -> int:
        """`d`: the number of entries of one sample (of the whole state outside batch
        mode)."""
        return self.z.shape[-1]

    def frozen(self) -> "FlatMap":
        """The same map with gradients stopped at every array of the FSpec."""
        bound = jax.tree.map(
            lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, self.f.bound
        )
        return eqx.tree_at(lambda m: m.f, self, self.f.with_bound(bound))

    def output(self, per_sample: Float[Array, " batch"]) -> Float[Array, "*batch"]:
        """Shape `(B,)` in batch mode, a scalar otherwise."""
        return per_sample if self.batched else per_sample[0]


def flat_map(f_spec: FSpec, x_star: Any, *, has_aux: bool, batch_axis: int | None,
             name: str) -> FlatMap:
    """Validate a regularizer call and build its `FlatMap`, with `x*` held constant.

    The checks are a solve's, so their messages speak of `x0`; they are re-raised
    naming the regularizer.
    """
    try:
        problem = make_problem(
            f_spec, x_star, has_aux=has_aux, trace=None, step_budget=None,
            batch_axis=batch_axis,
        )
    except (TypeError, ValueError) as e:
        where = " (x0 is x_star here.)" if "x0" in str(e) else ""
        raise type(e)(f"{name}: {e}{where}") from e
    layout = problem.f.layout
    if jnp.issubdtype(layout.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name}: x_star has dtype {layout.dtype}; the regularizers use real probes "
            "and support real floating-point states only. Split a complex state into "
            "its real and imaginary parts."
        )
    z = jax.lax.stop_gradient(problem.z0).astype(working_dtype(layout.dtype))
    return FlatMap(problem.f, z, layout.batched, _has_forward_mode(problem.f, z))


def _has_forward_mode(f: TracedFunction, z: Flat) -> bool:
    """Whether `jax.jvp` applies to `f`: not when it calls a `jax.custom_vjp`. (JAX only
    refuses such a JVP when it is lowered, so the check reads `f`'s jaxpr.)"""
    jaxpr = jax.make_jaxpr(FlatMap(f, z, False, True))(z).jaxpr
    return not calls_custom_vjp(jaxpr)


def sq_norms(u: Float[Array, "*probes batch features"]) -> Float[Array, "*probes batch"]:
    """Per-sample squared Euclidean norms (of each probe's state, given several)."""
    return jnp.sum(u * u, axis=-1)


def norms(u: Flat) -> Float[Array, " batch"]:
    """Per-sample Euclidean norms, with a zero (not NaN) gradient at zero."""
    sq = sq_norms(u)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def check_key(key: PRNGKeyArray | None, name: str) -> None:
    """Reject a missing, non-key or batched `key` (a typed key or a raw uint32 one)."""
    if key is None:
        raise TypeError(
            f"{name} draws random vectors and needs a PRNG key: pass "
            "key=jax.random.key(seed) (split a fresh one at every training step); "
            "got key=None."
        )
    shape = key_shape(key)
    if shape is None:
        described = type(key).__name__ + (f" of dtype {key.dtype}" if hasattr(key, "dtype")
                                          else "")
        raise TypeError(
            f"{name}: key must be a PRNG key such as jax.random.key(seed), got "
            f"{described}."
        )
    if shape != ():
        raise ValueError(
            f"{name}: key must be a single PRNG key, got an array of keys of shape "
            f"{key.shape}; use one key per call (jax.vmap over the keys for several)."
        )


def check_n_steps(n_steps: IntOption, name: str, what: str) -> int:
    """Return `n_steps` as an int, rejecting anything but an integer >= 1 known at
    trace time (it sets an array shape or a loop length)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(
            f"{name}: n_steps ({what}) must be a Python int >= 1, fixed at trace time; "
            f"got {n_steps!r} of type {type(n_steps).__name__}."
        )
    if n_steps < 1:
        raise ValueError(f"{name}: n_steps ({what}) must be >= 1, got {n_steps}.")
    return int(n_steps)
