"""The two-sequence reversible fixed-point scheme, whose step can be run backwards
exactly."""

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt

from banax import Solver
from banax.extend import (
    FlagOption,
    InvertibleStep,
    RealOption,
)

from ._common import Flat, check_bool, check_damp, damped

#: Largest denominator of `damp`.
MAX_DENOMINATOR = 256

#: Unsigned integer dtypes a step's record may use, smallest first.
RECORD_DTYPES = (jnp.uint8, jnp.uint16, jnp.uint32)

#: How far (in grid units) the backward pass's `β f` may be from the forward's for
#: the inverse still to recover the forward's rounded value.
RECOVERED_UNITS = 4

Ints = Int[Array, "batch features"]


class ReversibleState(eqx.Module):
    """The second sequence and the fixed-point grid both sequences live on.

    - `y`: the second sequence, `(B, N)` in the state's dtype.
    - `y_int`, `z_int`: both sequences as integers, `(B, N)`: `y = y_int / scale`.
    - `scale`: `2^s`, grid points per unit, `(B, 1)`, fixed per sample at `init`.
    - `remainders`, `z0`, `k`: only when recording (else None): what undoing each
        step needs, one unsigned integer per element and step, `(B, max_steps, N)`
        (uint8 for `damp` 0.5, 0.75 or 0.8); the initial iterate; the steps taken.
    """

    y: Flat
    y_int: Ints
    z_int: Ints
    scale: Float[Array, "batch 1"]
    remainders: UInt[Array, "batch steps features"] | None
    z0: Flat | None
    k: Int[Array, ""] | None


def _grid(dtype: Any) -> tuple[Any, Any, int]:
    """`(float dtype, integer dtype, bits)` of the grid for a state of `dtype`.

    A sample's initial values (`z0` and `f(z0)`) use `bits` bits of the integer and
    leave the rest as headroom, up to `2^(w − 3)` for a `w`-bit integer (so a step's
    sums never wrap): 50 bits and 11 of headroom for float64; for float32, float16 and
    bfloat16 (all on a float32 grid) 24 bits and 37 of headroom with int64 (x64
    enabled), else 23 bits and 6 of headroom with int32.
    """
    if jnp.dtype(dtype) == jnp.float64:
        return jnp.float64, jnp.int64, 50
    if jax.dtypes.canonicalize_dtype(jnp.int64) == jnp.int64:
        return jnp.float32, jnp.int64, 24
    return jnp.float32, jnp.int32, 23


def _limit(int_dtype: Any) -> int:
    """The largest magnitude a valid grid value may take."""
    return 2 ** (jnp.iinfo(int_dtype).bits - 3)


def _quantize(v: Float[Array, "batch features"], scale: Float[Array, "batch 1"],
              int_dtype: Any) -> tuple[Ints, Array]:
    """`round(v · scale)` and whether it is in range (False for NaN and infinities)."""
    v = v * scale
    ok = jnp.abs(v) <= _limit(int_dtype)
    return jnp.round(jnp.where(ok, v, 0)).astype(int_dtype), ok


class Reversible(Solver[ReversibleState], InvertibleStep):
    """Two coupled relaxed sequences whose step is exactly invertible.

    With `β = damp` and `y_0 = z_0`, each step computes

    `y_{k+1} = (1 − β) y_k + β f(z_k)`,
    `z_{k+1} = (1 − β) z_k + β f(y_{k+1})`.

    Both sequences converge to the fixed point of `f` when `f` is a contraction. Each
    step evaluates `f` twice (at `y_{k+1}` and at `z_{k+1}`); both evaluations are
    traced as ordinary evaluations.

    **Exact arithmetic.** In floating point the step cannot be undone exactly, and
    undoing it amplifies rounding by about `ρ / (1 − β)²` per step. So both sequences
    run on a fixed-point grid of spacing `2^-s` (s per sample, chosen at `init` from
    the magnitude of `z0` and `f(z0)`; see `_grid` for the bits), with `1 − β = n/d`
    rational: `y_{k+1} = round(y_k n / d) + round(β f(z_k))` in integers. The step loses
    only the remainder of the division by `d`, a digit in `[0, d)` per element and
    sequence; with it the step runs backwards bit for bit:
    `y_k = ((y_{k+1} − round(β f(z_k))) d + r) / n`. `f` receives the grid values cast
    to the state's dtype, and gradients through the step are those of the float
    iteration (straight-through the rounding), so BPTT through this solver gives the
    gradient of the relaxed iteration. An iterate that leaves the grid's range (more
    than 2^11 times the initial magnitude in float64) becomes NaN: the solve reports
    `DIVERGED`, never a wrapped value.

    **Recording.** `record=True` (which the reversible adjoint sets itself, through
    `recording()`) keeps, for every step and element, one unsigned integer in a
    `(B, max_steps, N)` buffer: both sequences' digits, and each sequence's rounded
    `β f` modulo a small `m` (see `_record_format`; for small `m` the `β f` term is
    rounded to a few grid units). That is 8 bits per element per
    step for `d ≤ 5` (`damp` 0.5, 0.75, 0.8), 16 for `d ≤ 85` (0.9, 0.95), 32 up to
    `d = 256` (0.99), against 64 (float32) or 128 (float64) for storing both
    sequences' trajectories. The backward pass evaluates `f` in another compiled
    program and may get it a grid unit or so differently; the residues let the inverse
    recover the forward's rounded value when its own is within a few grid units (at
    least ±4). `inverse_map` needs the recording; a rewind that
    still does not land on `z0` raises an error naming the fix rather than giving a
    wrong gradient.

    A poor choice when you do not need the reversible adjoint: it costs two evaluations
    of `f` per step and converges like `Relaxed`. Not for complex states.

    **Arguments:**

    - `damp`: the relaxation weight `β`, in (0, 1), a fraction with denominator at most
        256 (0.8 = 4/5, 0.95 = 19/20). Default 0.8.
    - `record`: keep what undoing every step needs, so that `inverse_map` works.
        Default False; the reversible adjoint's exact mode turns it on.
    - the options shared by every solver; see `banax.Solver`.
    """

    damp: RealOption = eqx.field(default=0.8, kw_only=True)
    record: FlagOption = eqx.field(default=False, kw_only=True)

    def __check_init__(self) -> None:
        check_damp(
            self, allow_one=False,
            why="; running the reversible step backwards divides by 1 - damp",
        )
        check_bool(self, "record")
        ratio = self._fraction
        if float(ratio) != float(self.damp):
            raise ValueError(
                f"Reversible: damp must be a fraction with denominator at most "
                f"{MAX_DENOMINATOR}, got {self.damp!r}; the step runs in exact integer "
                f"arithmetic with 1 - damp = n/d. The nearest such damp is "
                f"{float(ratio)!r} ({ratio})."
            )

    @property
    def _fraction(self) -> Fraction:
        """The fraction nearest to `β` with a denominator of at most 256."""
        return Fraction(float(self.damp)).limit_denominator(MAX_DENOMINATOR)

    @property
    def _ratio(self) -> tuple[int, int]:
        """`(n, d)` with `1 − β = n / d`."""
        beta = self._fraction
        return beta.denominator - beta.numerator, beta.denominator

    @property
    def _record_format(self) -> tuple[Any, int, int]:
        """`(dtype, m, unit)`: the smallest unsigned dtype that holds a step's record,
        the modulus of its residues, and the grid units of the `β f` term.

        A step's record for one element is `r_y + d (r_z + d (c_y + m c_z))`: the digits
        `r` both sequences drop and the residues `c = q mod m` of what they added,
        `q unit` grid units with `q = round(β f · 2^s / unit)`. `m` is the largest
        modulus whose `d² m²` codes fit the dtype (at least 3): uint8 with `m` = 8, 4, 3
        for `d` = 2, 4, 5; uint16 with `m` = 25, 12 for `d` = 10, 20; uint32 with
        `m ≥ 256` up to `d = 256`. The inverse recovers the forward's `q` when its own
        is within `±(m − 1) // 2`, so `unit` (a power of two) is the smallest making
        that at least ±4 grid units (4 for `d` = 4, 5; 2 for `d` = 2; else 1): a
        coarser `β f` term, never a coarser iterate.

        Grid units, not ulps of `f(b)`: the backward program evaluates `f` with other
        fusions and reduction orders, and a reduction's error scales with its terms, so
        an element of `f` near 0 can be thousands of its own ulps off while on the grid
        it is a unit or two (measured: up to 2 on a float32 `ConvCell`).
        """
        d = self._ratio[1]
        sizes = ((t, 2 ** (jnp.iinfo(t).bits // 2) // d) for t in RECORD_DTYPES)
        dtype, m = next((dtype, m) for dtype, m in sizes if m >= 3)
        unit = 1
        while (m - 1) // 2 * unit < RECOVERED_UNITS:
            unit *= 2
        return dtype, m, unit

    def recording(self) -> "Reversible":
        return eqx.tree_at(lambda s: s.record, self, True)

    def init(self, z0: Flat, fz0: Flat) -> ReversibleState:
        if jnp.issubdtype(z0.dtype, jnp.complexfloating):
            raise TypeError(
                f"Reversible: complex states ({z0.dtype}) are not supported; its exactly "
                "invertible step runs on a real fixed-point grid. Pass the real and "
                "imaginary parts as a real state, or use Relaxed."
            )
        work, int_dtype, bits = _grid(z0.dtype)
        size = jax.lax.stop_gradient(jnp.maximum(
            jnp.max(jnp.abs(z0.astype(work)), axis=-1),
            jnp.max(jnp.abs(fz0.astype(work)), axis=-1),
        ))
        _, exponent = jnp.frexp(jnp.where(jnp.isfinite(size) & (size > 0), size, 1))
        # Keep 2^s and 2^-s normal numbers, and the largest grid value finite.
        info = jnp.finfo(work)
        lowest = jnp.iinfo(int_dtype).bits - 1 - info.maxexp
        shift = jnp.clip(bits - exponent, lowest, -info.minexp)
        scale = jnp.ldexp(jnp.ones_like(size), shift)[:, None]
        z_int, _ = _quantize(z0.astype(work), scale, int_dtype)
        remainders, k, start = None, None, None
        if self.record:
            remainders = jnp.zeros((z0.shape[0], self.max_steps, z0.shape[1]),
                                   self._record_format[0])
            k, start = jnp.asarray(0), z0
        return ReversibleState(y=z0, y_int=z_int, z_int=z_int, scale=scale,
                               remainders=remainders, z0=start, k=k)

    def _relax(
        self, a_int: Ints, a: Flat, fb: Flat, scale: Float[Array, "batch 1"]
    ) -> tuple[Ints, Flat, Ints, Ints]:
        """`a' = (1 − β) a + β f(b)` on the grid: `(a'_int, a', digit, q)`.

        `a'` has the grid value, and the derivatives of the float step; the dropped
        `digit` and the added `q = round(β f(b) · 2^s / unit)` are what `_unrelax`
        needs to undo the step."""
        n, d = self._ratio
        unit = self._record_format[2]
        int_dtype, limit = a_int.dtype, _limit(a_int.dtype)
        q, ok = _quantize(self.damp * fb.astype(scale.dtype), scale / unit, int_dtype)
        # round(a n / d) = (a n + ⌊d/2⌋) // d, with a = u d + v split so that a n
        # cannot overflow.
        u, v = a_int // d, a_int % d
        t = v * n + d // 2
        new = u * n + t // d + q * unit
        ok = ok & (jnp.abs(q) <= limit // unit)
        ok = ok & (jnp.abs(a_int) <= limit) & (jnp.abs(new) <= limit)
        # Invalid values stay invalid, so a diverged sample never looks valid again.
        new = jnp.where(ok, new, limit + 1)
        value = jnp.where(ok, self._to_float(new, scale, a.dtype), jnp.nan)
        ideal = damped(a, fb, self.damp)
        return new, value + (ideal - jax.lax.stop_gradient(ideal)), t % d, q

    def _unrelax(self, new: Ints, fb: Flat, scale: Float[Array, "batch 1"],
                 digit: Ints, residue: Ints) -> Ints:
        """The `a_int` that `_relax(a_int, ·, fb, scale)` maps to `new`, dropping
        `digit` and adding a `q` with `q mod m = residue`."""
        n, d = self._ratio
        _, m, unit = self._record_format
        # The forward's q is the integer nearest to ours with its residue.
        own, _ = _quantize(self.damp * fb.astype(scale.dtype), scale / unit, new.dtype)
        half = (m - 1) // 2
        q = own + (residue - own + half) % m - half
        # a n = R d + digit − ⌊d/2⌋ with R = new − q unit = c n + e, so that
        # a = c d + (e d + digit − ⌊d/2⌋) / n, exactly and without overflow.
        rounded = new - q * unit
        c, e = rounded // n, rounded % n
        # A value off the grid (its solve diverged) stays off it.
        limit = _limit(new.dtype)
        return jnp.where(jnp.abs(new) <= limit, c * d + (e * d + digit - d // 2) // n,
                         limit + 1)

    def _encode(self, y_digit: Ints, z_digit: Ints, y_q: Ints, z_q: Ints
                ) -> UInt[Array, "batch features"]:
        """One step's record per element, `r_y + d (r_z + d (c_y + m c_z))`."""
        d = self._ratio[1]
        dtype, m, _ = self._record_format
        y_c, z_c = ((q % m).astype(dtype) for q in (y_q, z_q))
        return y_digit.astype(dtype) + d * (z_digit.astype(dtype) + d * (y_c + m * z_c))

    def _decode(self, code: UInt[Array, "batch features"], int_dtype: Any
                ) -> tuple[Ints, Ints, Ints, Ints]:
        """`(r_y, r_z, c_y, c_z)` of a record written by `_encode`."""
        d = self._ratio[1]
        m = self._record_format[1]
        parts = (code % d, code // d % d, code // (d * d) % m, code // (d * d * m))
        y_digit, z_digit, y_c, z_c = (p.astype(int_dtype) for p in parts)
        return y_digit, z_digit, y_c, z_c

    def _to_float(self, a_int: Ints, scale: Float[Array, "batch 1"], dtype: Any) -> Flat:
        return (a_int.astype(scale.dtype) / scale).astype(dtype)

    def step(
        self, f: Callable[..., tuple[Flat, Any]], z: Flat, fz: Flat, state: ReversibleState,
        trace: Any,
    ) -> tuple[Flat, Flat, ReversibleState, Any]:
        scale = state.scale
        y_int, y_next, y_digit, y_q = self._relax(state.y_int, state.y, fz, scale)
        fy_next, trace = f(y_next, trace)
        z_int, z_next, z_digit, z_q = self._relax(state.z_int, z, fy_next, scale)
        fz_next, trace = f(z_next, trace)
        remainders, k = state.remainders, state.k
        if self.record:
            # A recording solver's state holds both (see `init`).
            assert remainders is not None and k is not None
            codes = self._encode(y_digit, z_digit, y_q, z_q)
            remainders = jax.lax.dynamic_update_slice_in_dim(
                remainders, codes[:, None, :], k, axis=1)
            k = k + 1
        state = ReversibleState(
            y=y_next, y_int=y_int, z_int=z_int, scale=scale, remainders=remainders,
            z0=state.z0, k=k,
        )
        return z_next, fz_next, state, trace

    def forward_map(
        self, f: Callable[[Flat], Flat], z: Flat, state: ReversibleState
    ) -> tuple[Flat, ReversibleState]:
        """`(z_k, s_k) -> (z_{k+1}, s_{k+1})`: the loop's step, with untraced `f`."""
        z_next, _, state, _ = self.step(lambda v, t, tag=None: (f(v), t), z, f(z),
                                        state, None)
        return z_next, state

    def inverse_map(
        self, f: Callable[[Flat], Flat], z: Flat, state: ReversibleState
    ) -> tuple[Flat, ReversibleState]:
        """`(z_{k+1}, s_{k+1}) -> (z_k, s_k)`, bit for bit, from the recorded digits."""
        if not self.record:
            raise ValueError(
                "Reversible: inverse_map needs the digits recorded by the forward solve; "
                "run it with solver.recording() (Reversible(record=True))."
            )
        # A recording solver's state holds all three (see `init`).
        assert state.remainders is not None and state.k is not None and state.z0 is not None
        scale, k, int_dtype = state.scale, state.k - 1, state.z_int.dtype
        codes = jax.lax.dynamic_index_in_dim(state.remainders, k, axis=1, keepdims=False)
        y_digit, z_digit, y_c, z_c = self._decode(codes, int_dtype)
        first = k == 0
        # z_{k+1} came from f(y_{k+1}), y_{k+1} from f(z_k); z_0 need not be on the grid.
        z_int = self._unrelax(state.z_int, f(state.y), scale, z_digit, z_c)
        z_prev = jnp.where(first, state.z0, self._to_float(z_int, scale, z.dtype))
        y_int = self._unrelax(state.y_int, f(z_prev), scale, y_digit, y_c)
        y_prev = jnp.where(first, state.z0, self._to_float(y_int, scale, z.dtype))
        # Every state of a solve that stayed on the grid is on it, and back at the start
        # both sequences must be z0 on the grid. If not (f differed by more than the
        # recorded residues absorb), fail loudly: never a wrong gradient. A sample
        # that took no step (never rewound) is still at its start; one that left the
        # grid (its solve reported DIVERGED) cannot be rewound at all.
        start, _ = _quantize(state.z0.astype(scale.dtype), scale, z_int.dtype)

        def away(z_int: Ints, y_int: Ints) -> Array:
            return jnp.any((z_int != start) | (y_int != start), axis=-1)

        def on_grid(z_int: Ints, y_int: Ints) -> Array:
            limit = _limit(int_dtype)
            return jnp.all((jnp.abs(z_int) <= limit) & (jnp.abs(y_int) <= limit), axis=-1)

        valid = on_grid(state.z_int, state.y_int)
        missed = ~on_grid(z_int, y_int) | (first & away(state.z_int, state.y_int)
                                           & away(z_int, y_int))
        wrong = jnp.any(valid & missed)
        z_prev = eqx.error_if(
            z_prev, wrong,
            f"Reversible: the rewind did not return to z0: the backward pass evaluated "
            f"f more than {RECOVERED_UNITS} grid units away from the "
            f"forward pass, so the recorded steps cannot be undone exactly. Make f "
            f"reproducible (same dtype and inputs in both passes; on GPUs float32 "
            f"matmuls and convolutions may run in TF32, so set "
            f"jax_default_matmul_precision='highest'), or use the reversible adjoint's "
            f"mode='flat' (it replays the steps forwards) or "
            f"BPTT(loop_kind='checkpointed') for this cell.")
        state = ReversibleState(
            y=y_prev, y_int=y_int, z_int=z_int, scale=scale,
            remainders=state.remainders, z0=state.z0, k=k,
        )
        return z_prev, state
