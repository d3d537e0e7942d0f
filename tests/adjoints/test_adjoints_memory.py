"""Gradient memory against `max_steps`, from XLA's compiled memory analysis.

Only compiled, never run. On CPU `memory_analysis()` reports `temp_size_in_bytes`
(scratch buffers, where stored iterations live); the argument and output sizes do not
depend on the adjoint.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import banax
from banax.adjoint import BPTT, GDEQ, Implicit, Reversible, UnrollPhantom

N = 256


def _f(z, w):
    return jnp.tanh(w @ z)


def _solver(name, max_steps, **options):
    return banax.get_solver(name, rtol=1e-5, max_steps=max_steps, **options)


ADJOINTS = {
    "implicit": lambda n: Implicit(solver=_solver("picard", n),
                                   b_solver=_solver("picard", n)),
    "gdeq": lambda n: GDEQ(solver=_solver("broyden", n)),
    "unroll_phantom": lambda n: UnrollPhantom(solver=_solver("picard", n),
                                              b_solver=_solver("picard", 4)),
    "reversible": lambda n: Reversible(solver=_solver("reversible", n, damp=0.5)),
    "bptt_bounded": lambda n: BPTT(solver=_solver("picard", n, loop_kind="bounded")),
    "bptt_checkpointed": lambda n: BPTT(
        solver=_solver("picard", n, loop_kind="checkpointed")),
}


@functools.cache
def temp_bytes(name: str, max_steps: int) -> int:
    adjoint = ADJOINTS[name](max_steps)
    w = jnp.zeros((N, N), jnp.float32)

    def loss(w):
        return jnp.sum(adjoint((_f, (w,)), jnp.zeros(N, jnp.float32)).value)

    stats = jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis()
    return stats.temp_size_in_bytes


STATE = N * 4  # bytes of one float32 iterate


#: One adjoint per kind of gradient rule: a linear solve (JFB and NeumannPhantom share
#: Implicit's path), low-rank factors, an unroll from z*. The table in docs/adjoints.md
#: has all of them. The reversible adjoint's rewind records a few bits per element per
#: step: test_reversible_memory.py checks that this is all that grows, and that its flat
#: mode does not grow.
@pytest.mark.parametrize("name", [n for n in ADJOINTS
                                  if not n.startswith("bptt") and n != "reversible"])
def test_gradient_memory_does_not_depend_on_max_steps(name):
    # Bounded loops keep 16 iterations per level: 16 and 256 differ by a whole level.
    assert temp_bytes(name, 16) == temp_bytes(name, 256)


def test_bptt_memory_grows_with_max_steps_and_checkpointing_saves_it():
    bounded = [temp_bytes("bptt_bounded", n) for n in (16, 256)]
    checkpointed = [temp_bytes("bptt_checkpointed", n) for n in (16, 256)]
    # Both store iterations (at least one more iterate per 16 extra steps) ...
    assert bounded[1] - bounded[0] > STATE and checkpointed[1] - checkpointed[0] > STATE
    # ... but checkpointing stores far fewer of them.
    assert 3 * checkpointed[1] < bounded[1] and 3 * checkpointed[0] < bounded[0]
    # The O(1) adjoints use less than either.
    assert temp_bytes("implicit", 256) < checkpointed[0]
