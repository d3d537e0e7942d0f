"""Trajectory supervision (fixed-point correction, Bai et al., DEQ-Flow, CVPR 2022).

Besides the fixed point, supervise a few states sampled along the solve. Each earlier
state gets its gradient from a phantom gradient: a few damped cell steps from that
state (gradient stopped at the state itself), differentiated by backpropagation; the
final state keeps the layer's own adjoint.
"""

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._fspec import bind


def _check_positions(positions: Any, max_steps: int) -> tuple[int, ...]:
    if not (isinstance(positions, (tuple, list)) and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions)):
        raise TypeError(
            "trajectory: positions must be a tuple of ints (solver steps at which to "
            f"sample the state), got {positions!r}."
        )
    bad = [p for p in positions if not 0 <= p < max_steps]
    if bad or list(positions) != sorted(set(positions)):
        raise ValueError(
            f"trajectory: positions must be increasing steps in [0, max_steps={max_steps}) "
            f"(the final state is always returned), got {tuple(positions)}. Raise the "
            "solver's max_steps or sample earlier steps, e.g. evenly_spaced(3, max_steps)."
        )
    return tuple(positions)


def evenly_spaced(n: int, max_steps: int) -> tuple[int, ...]:
    """`n` steps spread evenly over `[0, max_steps)`, e.g. for `trajectory`'s
    `positions`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"evenly_spaced: n must be an int >= 1, got {n!r}.")
    return tuple(sorted({int(k) for k in jnp.linspace(0, max_steps, n + 1)[:-1]}))


def trajectory(
    deq: Any,
    x: Any,
    positions: Sequence[int],
    *,
    key: PRNGKeyArray | None = None,
    phantom_steps: int = 2,
    damp: float = 0.8,
) -> list[Any]:
    """States sampled along `deq`'s solve of `x`, each carrying a gradient.

    Returns `[z_{k₁}', …, z_{k_n}', z*]`: for each position `k` (an evaluation count
    of the cell, which is the step count for solvers with one evaluation per step such
    as Picard and Anderson; a solve that converged earlier gives its final iterate), the
    iterate `z_k` reached after `k` steps, then `phantom_steps` damped cell steps
    `z ← (1 − β) z + β f(z)` from `stop_gradient(z_k)`, differentiated by
    backpropagation (torchdeq's phantom gradient); and last the layer's own output
    `z*`, with the layer's adjoint. With no positions it is `[deq(x)]`. The state may be
    any pytree (each state in the list has its structure, e.g. a
    `banax.nn.MultiscaleCell`'s tuple of maps).

    The forward solve runs once, with a trace that keeps the sampled iterates; the
    extra cost is `len(positions) · phantom_steps` cell evaluations (and their
    backward passes).
    """
    solver = deq.solver
    positions = _check_positions(positions, solver.max_steps)
    if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) \
            or phantom_steps < 1:
        raise ValueError(
            f"trajectory: phantom_steps must be an int >= 1, got {phantom_steps!r}."
        )
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
        raise ValueError(f"trajectory: damp must be in (0, 1], got {damp!r}.")
    if not positions:
        return [deq(x, key=key)]
    z0 = deq.initial_state(jax.tree.map(jnp.asarray, x))
    # A NumPy constant, not a traced array: the trace function closes over it, and a
    # traced value closed over by it broke jit(grad(...)) at lowering.
    where = np.asarray(positions)

    def select(mask: Array, new: Any, old: Any) -> Any:
        # Per leaf: `new` (broadcast over the positions) where `mask`, else `old`.
        return jax.tree.map(
            lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * a.ndim), a[None], b),
            new, old)

    def keep(acc: Any, z: Any, fz: Any, aux: Any, **tags: Any) -> Any:
        count, samples = acc
        if tags.get("tag") is not None:  # a trial evaluation, not an iterate
            return acc
        return count + 1, select(where == count, z, samples)

    samples = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (len(positions),) + a.shape),
                           z0)
    z_star, solution = deq(x, key=key, z0=z0, trace=(keep, (jnp.asarray(0), samples)),
                           return_solution=True)
    count, samples = solution.trace
    # Positions the solve never reached hold its final iterate.
    samples = select(where >= count, jax.lax.stop_gradient(z_star), samples)
    f = bind(deq.f_spec(x, key))

    def phantom(z: Any) -> Any:
        z = jax.lax.stop_gradient(z)
        for _ in range(phantom_steps):
            z = jax.tree.map(lambda a, fa: (1 - damp) * a + damp * fa, z, f(z))
        return z

    return [phantom(jax.tree.map(lambda a: a[i], samples))
            for i in range(len(positions))] + [z_star]


def trajectory_loss(
    losses: Sequence[Array],
    weights: Literal["exponential", "linear", "constant"] = "exponential",
    gamma: float = 0.8,
) -> Array:
    """Combine per-state losses `[L₁, …, L_n]` (the last for `z*`) into
    `Σ_i w_i L_i / Σ_i w_i`.

    `"exponential"`: `w_i = γ^{n−i}` (DEQ-Flow's, `γ = 0.8`: later states weigh more);
    `"linear"`: `w_i = i`; `"constant"`: `w_i = 1`.
    """
    n = len(losses)
    if n < 1:
        raise ValueError("trajectory_loss: give at least one loss.")
    if weights == "exponential":
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) \
                or not 0 < gamma <= 1:
            raise ValueError(f"trajectory_loss: gamma must be in (0, 1], got {gamma!r}.")
        w = [gamma ** (n - 1 - i) for i in range(n)]
    elif weights == "linear":
        w = [float(i + 1) for i in range(n)]
    elif weights == "constant":
        w = [1.0] * n
    else:
        raise ValueError(
            "trajectory_loss: weights must be 'exponential', 'linear' or 'constant', "
            f"got {weights!r}."
        )
    total = sum(wi * li for wi, li in zip(w, losses))
    return jnp.asarray(total / sum(w))

