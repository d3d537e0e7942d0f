"""Limited-memory Broyden's method on the residual `g(z) = f(z) − z`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Inexact, Int

from banax import Solver
from banax.extend import (
    IntOption,
    LowRankInverseJacobian,
    RealOption,
    residual_norms,
    stats_dtype,
    working_dtype,
)

from ._common import (
    Flat,
    after,
    check_int,
    check_nonnegative,
    history_combine,
    history_dot,
    sample_dot,
    sample_norm,
)

# Sufficient-decrease constant of the Armijo test ‖g(z + αd)‖² ≤ (1 − cα) ‖g(z)‖².
_ARMIJO = 1e-4


class BroydenState(eqx.Module):
    """`H = −I + Σ_i u_i v_iᴴ ≈ (∂g/∂z)⁻¹` per sample, as a ring buffer of rank-1 terms
    (`ᴴ` is the conjugate transpose, a plain transpose for real states).

    `u` and `v` have shape `(B, history_size, N)`, unused slots are zero; `direction` is
    the next step `−H g(z)` at the current iterate, `(B, N)` (kept so that each product
    with `H` is computed once). All are in `banax.extend.working_dtype` of the state (at least
    float32). `count` is the number of
    updates made so far (shared by all samples); the next goes to slot
    `count % history_size`.
    """

    u: Inexact[Array, "batch history features"]
    v: Inexact[Array, "batch history features"]
    direction: Inexact[Array, "batch features"]
    count: Int[Array, ""]


def _low_rank(a: Inexact[Array, "batch history features"],
              b: Inexact[Array, "batch history features"],
              x: Inexact[Array, "batch features"]) -> Inexact[Array, "batch features"]:
    """`Σ_i a_i ⟨b_i, x⟩` per sample: with `(a, b) = (u, v)` this is `(H + I) x`, with
    `(v, u)` it is `(Hᴴ + I) x`."""
    return history_combine(history_dot(b, x), a)


class Broyden(Solver[BroydenState], LowRankInverseJacobian):
    """Limited-memory ("good") Broyden quasi-Newton method, with optional line search.

    Solves `g(z) = f(z) − z = 0` with quasi-Newton steps `z ← z + α d`, `d = −H g(z)`,
    where `H ≈ (∂g/∂z)⁻¹ = (J − I)⁻¹` starts at `−I` (so the first step is a Picard step)
    and receives after each step, with `s = Δz` and `y = Δg`, the rank-1 update

    `H ← H + u vᴴ`, `u = (s − H y) / (sᴴ H y)`, `v = Hᴴ s`,

    which makes the new `H` map `y` to `s` (`ᴴ` is the conjugate transpose, so complex
    states work; it is the plain transpose for real ones). The last `history_size` updates are kept,
    oldest overwritten first. Each update is scaled down so that its spectral norm
    `‖u‖ ‖v‖` is at most `spectral_clip`, which keeps one bad secant pair from wrecking
    `H`; an update whose denominator `sᴴ H y` vanishes is skipped.

    With `ls_steps > 0`, a step whose residual does not satisfy the Armijo test
    `‖g(z + αd)‖² ≤ (1 − 10⁻⁴ α) ‖g(z)‖²` is retried with `α` halved, up to `ls_steps`
    times per step (each retry is one more evaluation of `f`); the last trial is
    accepted if none passes. Every evaluation made by the line search, the first
    full-step trial included, is traced with `tag="line_search"`; with `ls_steps=0`
    there is no line search and no tag. A sample that
    already meets the tolerance does not backtrack. In batch mode step sizes are per
    sample, and every retry evaluates `f` on the whole batch.

    Near a fixed point with a Jacobian close to linear, Broyden converges superlinearly;
    it is the method of choice when `∂f/∂z` has eigenvalues close to 1. For complex
    states `H` is complex-linear, which matches `∂f/∂z` when `f` is holomorphic; an `f`
    that uses `conj` or `abs` of the state has only a real-linear Jacobian, and Broyden
    then loses its fast convergence (solve the real form `[Re z, Im z]` instead). `H` also gives
    GDEQ its preconditioner: see `inverse_jacobian_factors`.

    A poor choice when `f` is cheap and well contracting (Picard costs less per step),
    and with `ls_steps > 0` for BPTT or the reversible adjoint, since a data-dependent
    line search cannot be unrolled (`differentiable_step` is then False). The state
    holds `2 · history_size` vectors per sample.

    **Arguments:**

    - `history_size`: number of rank-1 updates kept, an int >= 1. Default 10.
    - `ls_steps`: maximum number of step-size halvings per step, an int >= 0; 0 disables
        the line search. Default 0.
    - `spectral_clip`: bound on the spectral norm of each rank-1 update, a number > 0,
        or None for no clipping. Default 1.5.
    - the options shared by every solver; see `banax.Solver`.
    """

    history_size: IntOption = eqx.field(default=10, kw_only=True)
    ls_steps: IntOption = eqx.field(default=0, kw_only=True)
    spectral_clip: RealOption | None = eqx.field(default=1.5, kw_only=True)

    def __check_init__(self) -> None:
        check_int(self, "history_size", 1)
        check_int(self, "ls_steps", 0)
        check_nonnegative(self, "spectral_clip", allow_none=True, strict=True)

    @property
    def differentiable_step(self) -> bool:
        return self.ls_steps == 0

    def init(self, z0: Flat, fz0: Flat) -> BroydenState:
        dtype = working_dtype(z0.dtype)
        shape = (z0.shape[0], self.history_size, z0.shape[1])
        zeros = jnp.zeros(shape, dtype)
        # H₀ = −I, so the first direction −H₀ g(z₀) is the residual: a Picard step.
        direction = fz0.astype(dtype) - z0.astype(dtype)
        return BroydenState(u=zeros, v=zeros, direction=direction, count=jnp.asarray(0))

    def step(
        self, f: Callable[..., tuple[Flat, Any]], z: Flat, fz: Flat, state: BroydenState, trace: Any
    ) -> tuple[Flat, Flat, BroydenState, Any]:
        dtype = working_dtype(z.dtype)
        d = state.direction
        # Hᴴ d, before the evaluation; v = Hᴴ s follows from s = α d (α real).
        h_t_d = _low_rank(state.v, state.u, d) - d
        z_next, fz_next, alpha, trace = self._line_search(f, z, fz, d, trace)
        g = fz.astype(dtype) - z.astype(dtype)
        g_next = fz_next.astype(dtype) - z_next.astype(dtype)
        # The secant pair uses the iterates as stored, so H maps what the loop sees.
        s = z_next.astype(dtype) - z.astype(dtype)
        y = g_next - g
        v = alpha[:, None].astype(dtype) * h_t_d
        # H g_next with and without the oldest term, which the new one replaces, in one
        # pass over u.
        slot = state.count % self.history_size
        coef = history_dot(state.v, g_next)
        kept = jnp.where(jnp.arange(self.history_size)[None] == slot, 0, coef)
        h_g_next, h_kept_g_next = (
            jnp.einsum("bkm,bmn->bkn", jnp.stack([coef, kept], 1), state.u,
                       precision=jax.lax.Precision.HIGHEST)
            - g_next[:, None]
        ).transpose(1, 0, 2)
        h_y = h_g_next + d  # H g = −d
        # Four separate reductions: stacking the operands into one costs more on CPU
        # (the stacks are written out, 4 × B × N each).
        denom, v_v, y_y, v_g = (sample_dot(v, y), sample_dot(v, v), sample_dot(y, y),
                                sample_dot(v, g_next))
        v_v, y_y = jnp.real(v_v), jnp.real(y_y)
        # denom = sᴴ H y up to the rounding of the iterate.
        tiny = float(jnp.finfo(dtype).eps) * jnp.sqrt(v_v) * jnp.sqrt(y_y)
        usable = jnp.abs(denom) > tiny
        # Double `where` so that skipped updates give zero, not NaN, gradients.
        safe = jnp.where(usable, denom, 1)
        u = jnp.where(usable[:, None], (s - h_y) / safe[:, None], 0)
        if self.spectral_clip is not None:
            size = sample_norm(u) * jnp.sqrt(v_v)
            big = size > self.spectral_clip
            shrink = jnp.where(big, self.spectral_clip / jnp.where(big, size, 1), 1)
            u = u * shrink[:, None].astype(dtype)
        v = after(v, coef)
        new_state = BroydenState(
            u=state.u.at[:, slot].set(u),
            v=state.v.at[:, slot].set(v),
            # −H' g_next with H' = H − u_old v_oldᴴ + u vᴴ.
            direction=-(h_kept_g_next + u * v_g[:, None]),
            count=state.count + 1,
        )
        return z_next, fz_next, new_state, trace

    def _line_search(
        self, f: Callable[..., tuple[Flat, Any]], z: Flat, fz: Flat,
        direction: Inexact[Array, "batch features"], trace: Any,
    ) -> tuple[Flat, Flat, Float[Array, " batch"], Any]:
        """Evaluate the full step, then backtrack per sample (Armijo) if enabled.

        Returns the accepted iterate, `f` there, the (real) step sizes and the trace.
        With the line search enabled every evaluation here is tagged, the full step
        included: it is the search's first trial."""
        base = z.astype(direction.dtype)

        def trial(alpha: Float[Array, " batch"]) -> Flat:
            step = alpha[:, None].astype(direction.dtype) * direction
            return (base + step).astype(z.dtype)

        alpha = jnp.ones(z.shape[0], stats_dtype(z.dtype))
        z_try = trial(alpha)
        if self.ls_steps == 0:
            fz_try, trace = f(z_try, trace)
            return z_try, fz_try, alpha, trace
        fz_try, trace = f(z_try, trace, tag="line_search")

        abs0, rel0 = residual_norms(z, fz)
        settled = self.meets_tolerance(abs0, rel0)

        def accepted(alpha: Array, z_t: Flat, fz_t: Flat) -> Bool[Array, " batch"]:
            abs_t, rel_t = residual_norms(z_t, fz_t)
            # Written so that a NaN trial is rejected.
            armijo = abs_t**2 <= (1 - _ARMIJO * alpha) * abs0**2
            return settled | armijo | self.meets_tolerance(abs_t, rel_t)

        def cond(carry: tuple) -> Bool[Array, ""]:
            i, alpha, z_t, fz_t, ok, trace = carry
            return (i < self.ls_steps) & ~jnp.all(ok)

        def body(carry: tuple) -> tuple:
            i, alpha, z_t, fz_t, ok, trace = carry
            alpha = jnp.where(ok, alpha, alpha / 2)
            z_new = trial(alpha)
            fz_new, trace = f(z_new, trace, tag="line_search")
            z_t = jnp.where(ok[:, None], z_t, z_new)
            fz_t = jnp.where(ok[:, None], fz_t, fz_new)
            return i + 1, alpha, z_t, fz_t, accepted(alpha, z_t, fz_t), trace

        carry = (jnp.asarray(0), alpha, z_try, fz_try, accepted(alpha, z_try, fz_try), trace)
        _, alpha, z_t, fz_t, _, trace = jax.lax.while_loop(cond, body, carry)
        return z_t, fz_t, alpha, trace

    def inverse_jacobian_factors(
        self, state: BroydenState
    ) -> tuple[Inexact[Array, "batch rank features"], Inexact[Array, "batch rank features"]]:
        """`(U, V)` with `(I − J)⁻¹ ≈ I + U[b]ᵀ V[b]` per sample (shapes `(B, m, N)`).

        Since `H ≈ (J − I)⁻¹ = −(I − J)⁻¹` and `H = −I + Σ u_i v_iᴴ`, this is
        `(−u, conj(v))`: the capability's `ᵀ` is a plain transpose.
        """
        return -state.u, jnp.conj(state.v)
