"""The reversible adjoint: backpropagation through an invertible solver's steps, by
rewinding them exactly or by replaying them from a few checkpoints."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import banax
from banax import BackwardStats, Result
from banax.extend import (
    AbstractBackwardRuleAdjoint,
    AbstractSolver,
    FlatSolution,
    IntOption,
    InvertibleStep,
    Problem,
    check_choice,
    check_integer,
    where_per_sample,
)

from ._validation import check_differentiable_step, check_solver

MODES = ("exact", "flat")


def _mask(active: jax.Array, cotangent: Any) -> Any:
    """Zero the cotangent rows of inactive samples (scalars are shared: kept)."""
    return where_per_sample(active, cotangent, jax.tree.map(jnp.zeros_like, cotangent))


class _Walk(eqx.Module):
    """The cotangents carried backwards over the steps: of the iterate, of the
    solver state's floating-point leaves, and of the parameters."""

    z_bar: jax.Array
    s_bar: Any
    p_bar: Any


def _pull_back(step: Callable[..., Any], params: Any, z: jax.Array, s: Any,
               walk: _Walk, active: Bool[Array, " batch"], safe: Any = None) -> _Walk:
    """Pull the cotangent of step `k + 1` back through the step at `(z_k, s_k)` for the
    `active` samples; the others keep theirs. Where their state may not be finite, the
    step runs at `safe` for them, so that their zero cotangent pulls back to zero."""
    if safe is not None:
        z, s = where_per_sample(active, (z, s), safe)
    _, vjp = eqx.filter_vjp(step, params, z, s)
    p_step, z_bar, s_bar = vjp((_mask(active, walk.z_bar), _mask(active, walk.s_bar)))
    z_bar, s_bar = where_per_sample(active, (z_bar, s_bar), (walk.z_bar, walk.s_bar))
    return _Walk(z_bar, s_bar, jax.tree.map(jnp.add, walk.p_bar, p_step))


class Reversible(AbstractBackwardRuleAdjoint):
    """Exact gradient of the steps an invertible solver ran, in little memory.

    The forward solver's step is a map `(z, s) ↦ Φ(z, s; θ)` on the iterate and the
    solver state (the reversible solver's second sequence). The forward pass keeps
    only the final `(z_K, s_K)` and each sample's step count `K`; the backward pass
    needs the states `(z_k, s_k)` in reverse order, and at each one pulls the
    cotangent back through `Φ` with one VJP, accumulating the parameter gradient:

        (z̄_k, s̄_k, θ̄) ← VJP of Φ at (z_k, s_k; θ) applied to (z̄_{k+1}, s̄_{k+1}).

    Finally the cotangent goes through the solver's `init` to `θ` and `x0`. The
    result is the gradient BPTT gives through the same steps; in batch mode sample `b`
    is walked back over its own `K_b` steps. The two modes differ in how they get the
    states back:

    - `mode="exact"` (the default): the forward runs the solver's `recording()` form,
        and the backward undoes one step at a time with the solver's `inverse_map`.
        With the reversible solver the rewind is bit-exact (integer steps, recording
        a byte per element per step for `damp=0.8`); the recording is allocated for
        `max_steps` steps. Cost per step: one inverse and one VJP. A rewind that does
        not land on `z0` raises an error.
    - `mode="flat"`: nothing is recorded. The backward replays the forward steps from
        `x0` with `forward_map`, keeping at most `checkpoints` states (the step at the
        middle of what is left, then the middle of the rest, ...), so memory does not
        depend on `max_steps`, and about `log2(K) / 2` extra forward steps per step
        while `K < 2^checkpoints`. The replay's end is compared with the forward's
        `z*`: the backward report's `abs_err` is `‖z_K(replay) − z*‖₂` per sample and
        `rel_err` that over `‖z*‖₂`; above `√eps` of the dtype the result is
        `DIVERGED` (the backward program evaluated `f` differently enough to change
        the trajectory), and `on_failure` acts on it.

    In both modes a sample whose forward solve diverged (e.g. an iterate left the
    reversible solver's integer grid) is not walked back: its backward result is
    `DIVERGED`, its gradient contribution zero.

    **Arguments:**

    - `solver`: a solver with the `banax.extend.InvertibleStep` capability (e.g.
        `banax.solver.Reversible`), a differentiable step and `keep_best=False`. Any
        `loop_kind`; `"lax"` is cheapest since the loop itself is never differentiated.
    - `mode`: `"exact"` or `"flat"`, see above. Default `"exact"`.
    - `checkpoints`: the states `mode="flat"` keeps, an int >= 1 (the first is `x0`'s).
        Default 16.
    - `on_failure`: `"warn"`, `"raise"` or `"ignore"`; see
      `banax.extend.AbstractBackwardRuleAdjoint`.
    """

    solver: AbstractSolver
    mode: str = eqx.field(default="exact", kw_only=True)
    checkpoints: IntOption = eqx.field(default=16, kw_only=True)

    backward_failure_advice = (
        "the backward pass could not rebuild the forward steps for some samples (the "
        "replay of mode='flat' ended away from z*, or the forward solve itself "
        "diverged); the gradient of this step is unreliable. Make f reproducible between "
        "the forward and backward passes (the same dropout key, no state that changes "
        "between calls, the same matmul precision), or use mode='exact' or BPTT with "
        "checkpoints; pass on_failure='raise' to stop here. A backward_probe reports the "
        "replay's distance from z* in abs_err and rel_err."
    )

    def __check_init__(self) -> None:
        check_solver("Reversible", "solver", self.solver)
        if not isinstance(self.solver, InvertibleStep):
            raise banax.PairingError(
                f"Reversible: {type(self.solver).__name__} cannot invert its step (it "
                "lacks the banax.extend.InvertibleStep capability). Use the reversible solver, "
                "Reversible(solver=banax.get_solver('reversible', damp=0.8)), or BPTT "
                "with loop_kind='checkpointed' for exact unrolled gradients of this "
                "solver."
            )
        check_differentiable_step("Reversible", self.solver)
        if self.solver.keep_best:
            raise ValueError(
                "Reversible: keep_best=True returns an earlier iterate, but the "
                "reversible adjoint walks back from the last one. Set keep_best=False, "
                "or use BPTT or Implicit."
            )
        check_choice(self, "mode", self.mode, MODES)
        check_integer(
            self, "checkpoints", self.checkpoints, minimum=1,
            why="; mode='flat' keeps that many states of its replay",
        )

    def _invertible(self) -> Any:
        """The solver, an iterative one with the `InvertibleStep` capability (checked at
        construction); typed `Any` as Python has no intersection type."""
        return self.solver

    def solve(self, problem: Problem) -> FlatSolution:
        if self.mode == "flat":
            return super().solve(problem)
        # The forward solve keeps what the rewind needs (for the reversible solver, the
        # digits its step drops); `backward` then sees the same recording solver.
        recording: Reversible = eqx.tree_at(
            lambda a: a.solver, self, self._invertible().recording())
        return super(Reversible, recording).solve(problem)

    def backward(
        self, problem: Problem, forward: FlatSolution, g: jax.Array
    ) -> tuple[Any, jax.Array, BackwardStats]:
        solver = self._invertible()
        params, f_with = problem.parameters()
        f = problem.f.evaluate
        z0 = problem.z0
        start = solver.init(z0, f(z0))
        # A diverged sample gets no gradient.
        diverged = forward.result == Result.DIVERGED
        steps = forward.stats.steps

        def step(p: Any, z: jax.Array, s: Any) -> tuple[jax.Array, Any]:
            return solver.forward_map(f_with(p), z, s)

        walk = _Walk(
            z_bar=_mask(~diverged, g),
            s_bar=jax.tree.map(jnp.zeros_like,
                               eqx.filter(start, eqx.is_inexact_array)),
            p_bar=jax.tree.map(jnp.zeros_like, params),
        )
        if self.mode == "exact":
            # A diverged sample is rewound too (the solver keeps a state that left the
            # grid invalid, and its check skips it), but pulls nothing back.
            walk = _rewind(solver, f, step, params, (forward.z, forward.state),
                           (z0, start), walk, steps, diverged)
            distance = jnp.zeros(steps.shape, forward.z.dtype)
        else:
            # A diverged sample is not replayed: it stays at its start.
            steps = jnp.where(diverged, 0, steps)
            walk, distance = _replay(solver, f, step, params, (z0, start), walk, steps,
                                     forward.z, self.checkpoints)

        def init(p: Any, z0: jax.Array) -> Any:
            return solver.init(z0, f_with(p)(z0))

        _, vjp = eqx.filter_vjp(init, params, z0)
        p_init, z0_bar = vjp(walk.s_bar)
        distance = jnp.where(diverged, jnp.inf, distance)
        size = jnp.linalg.norm(forward.z, axis=-1)
        relative = distance / jnp.where(size > 0, size, 1)
        ok = ~diverged & (relative <= jnp.sqrt(jnp.finfo(forward.z.dtype).eps))
        report = BackwardStats(
            steps=steps.astype(jnp.float32),
            abs_err=distance.astype(jnp.float32),
            rel_err=relative.astype(jnp.float32),
            result=jnp.where(ok, Result.CONVERGED, Result.DIVERGED).astype(jnp.float32),
        )
        return jax.tree.map(jnp.add, walk.p_bar, p_init), walk.z_bar + z0_bar, report


def _rewind(solver: Any, f: Callable[..., Any], step: Callable[..., Any], params: Any,
            final: tuple[jax.Array, Any], first: tuple[jax.Array, Any], walk: _Walk,
            steps: Int[Array, " batch"], diverged: Bool[Array, " batch"]) -> _Walk:
    """Walk back from the `final` state with `solver.inverse_map`, one step at a
    time, pulling back for the samples that did not diverge (`first` is the start)."""

    def body(i: jax.Array, carry: tuple) -> tuple:
        (z, s), walk = carry
        # Step k = K_max − 1 − i of every sample that took more than k steps.
        active = jnp.max(steps) - 1 - i < steps
        z_prev, s_prev = solver.inverse_map(f, z, s)
        walk = _pull_back(step, params, z_prev, s_prev, walk, active & ~diverged, first)
        return where_per_sample(active, (z_prev, s_prev), (z, s)), walk

    _, walk = jax.lax.fori_loop(0, jnp.max(steps), body, (final, walk))
    return walk


def _replay(solver: Any, f: Callable[..., Any], step: Callable[..., Any], params: Any,
            first: tuple[jax.Array, Any], walk: _Walk, steps: Int[Array, " batch"],
            z_star: jax.Array, slots: int) -> tuple[_Walk, Float[Array, " batch"]]:
    """Walk back by replaying the forward steps from `first`, keeping at most `slots`
    states on a stack.

    Each iteration either advances a cursor by one forward step or, when the cursor is
    at the step `t` to pull back through, does that VJP and moves the cursor to the
    highest kept state at or below `t − 1`. On its way up the cursor keeps the state
    halfway between the top of the stack and `t` (bisection), so the stack holds
    `1 + log2(K)` states and each step is replayed about `log2(K) / 2` times; with the
    stack full, the cursor walks up without keeping anything. The walk starts at
    `t = K_max`, where instead of a VJP the replayed `z_K` is compared with the forward's
    `z*`: that distance is returned.
    """
    last = jnp.max(steps)
    stack = jax.tree.map(lambda a: jnp.zeros((slots,) + a.shape, a.dtype), first)
    stack = jax.tree.map(lambda b, a: b.at[0].set(a), stack, first)
    positions = jnp.zeros(slots, last.dtype)

    def advance(carry: tuple) -> tuple:
        t, j, cursor, stack, positions, top, walk, distance = carry
        active = j < steps
        cursor = where_per_sample(active, solver.forward_map(f, *cursor), cursor)
        j = j + 1
        below = positions[top - 1]
        keep = (j == below + (t - below + 1) // 2) & (j < t) & (top < slots)
        slot = jnp.minimum(top, slots - 1)
        stack = jax.tree.map(
            lambda b, a: b.at[slot].set(jnp.where(keep, a, b[slot])), stack, cursor)
        positions = positions.at[slot].set(jnp.where(keep, j, positions[slot]))
        return t, j, cursor, stack, positions, top + keep.astype(top.dtype), walk, distance

    def pull_back(carry: tuple) -> tuple:
        t, j, cursor, stack, positions, top, walk, distance = carry
        z, s = cursor
        walk = _pull_back(step, params, z, s, walk, t < steps)
        distance = jnp.where(t == last, jnp.linalg.norm(z - z_star, axis=-1), distance)
        t = t - 1
        top = top - (positions[top - 1] > t).astype(top.dtype)
        # Never below the first slot, x0's, which the last pull-back (t = 0) leaves.
        index = jnp.maximum(top - 1, 0)
        cursor = jax.tree.map(lambda b: b[index], stack)
        return t, positions[index], cursor, stack, positions, top, walk, distance

    def body(carry: tuple) -> tuple:
        t, j = carry[:2]
        return jax.lax.cond(j == t, pull_back, advance, carry)

    carry = (last, jnp.zeros_like(last), first, stack, positions, jnp.asarray(1),
             walk, jnp.zeros(steps.shape, z_star.dtype))
    carry = jax.lax.while_loop(lambda c: c[0] >= 0, body, carry)
    return carry[6], carry[7]
