"""Compiled gradient memory of every adjoint against `max_steps` (docs/adjoints.md).

Run: `python benchmarks/adjoint_memory.py` (about three minutes on two CPU cores), or
`python benchmarks/adjoint_memory.py Reversible "BPTT checkpointed"` for the rows whose
names contain one of the arguments. For `f(z) = tanh(z Wᵀ + b)` with a batch of 64
states of 512 float32 features, `rtol=1e-5`, `batch_axis=0`, it compiles `jax.grad` of
a loss through each adjoint at `max_steps` 16, 256 and 4096 and prints XLA's
`temp_size_in_bytes` in MiB (the field the CPU backend reports meaningfully). Nothing
is run, only compiled.
"""

import sys

import jax
import jax.numpy as jnp
import lineax as lx

import banax
from banax.adjoint import BPTT, GDEQ, JFB, Implicit, NeumannPhantom, Reversible, UnrollPhantom


def main() -> None:
    w = 0.9 * jax.random.orthogonal(jax.random.key(0), 512)
    b, x0 = jnp.zeros(512), jnp.zeros((64, 512))

    def f(z, w, b):
        return jnp.tanh(z @ w.T + b)

    def s(name, n, **options):
        return banax.get_solver(name, rtol=1e-5, max_steps=n, batch_axis=0, **options)

    rows = {
        "BPTT bounded": lambda n: BPTT(solver=s("picard", n, loop_kind="bounded")),
        "BPTT checkpointed": lambda n: BPTT(solver=s("picard", n, loop_kind="checkpointed")),
        "Implicit Picard": lambda n: Implicit(solver=s("picard", n), b_solver=s("picard", n)),
        "Implicit GMRES": lambda n: Implicit(solver=s("picard", n),
                                             b_solver=lx.GMRES(rtol=1e-5, atol=1e-5)),
        "JFB": lambda n: JFB(solver=s("picard", n)),
        "GDEQ": lambda n: GDEQ(solver=s("broyden", n)),
        "UnrollPhantom": lambda n: UnrollPhantom(solver=s("picard", n),
                                                 b_solver=s("picard", 5)),
        "NeumannPhantom": lambda n: NeumannPhantom(solver=s("picard", n),
                                                   b_solver=s("picard", 5)),
        "Reversible exact": lambda n: Reversible(solver=s("reversible", n, damp=0.8)),
        "Reversible flat": lambda n: Reversible(solver=s("reversible", n, damp=0.8),
                                                mode="flat"),
    }
    wanted = sys.argv[1:]
    for name, make in rows.items():
        if wanted and not any(w in name for w in wanted):
            continue
        mib = []
        for n in (16, 256, 4096):
            adjoint = make(n)

            def loss(w, b, adjoint=adjoint):
                return jnp.sum(adjoint((f, (w, b)), x0).value ** 2)

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, b).compile()
            mib.append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
        print(f"{name:18s}", "  ".join(f"{m:6.2f}" for m in mib))


if __name__ == "__main__":
    main()
