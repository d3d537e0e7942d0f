"""Training-step wall time and collectives of each multi-device layout of a DEQ.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        uv run python benchmarks/multi_device.py [--repeats 20]

A `banax.DEQ` on `banax.nn.MLPCell(256, hidden 1024)`, Anderson in batch mode to
`rtol=1e-6`, the implicit adjoint, batch 32, one Adam step, on a mesh of all devices
in each layout: one device; data parallel (batch split, parameters replicated); FSDP
(parameters split over the data axis, gathered at the layer's entry); per-shard solves
(`PerShardSolve`); data × model (2 × 4: hidden units split over the model axis). Then a
DEQ on `banax.nn.TransformerCell(64, 8 heads, hidden 256)` over sequences of 16
positions, batch 8, Anderson to `rtol=1e-4`, on one device and split by heads over a
data × model (2 × 4) mesh (`transformer_cell_specs`). Prints per layout the
median step time, the forward solve's steps, and the collectives of the compiled
step inside the solver's loops (run once per iteration) and outside (once per step),
from `hlo_collectives.py`. On simulated CPU devices a collective is a memory copy
between threads, so the times show the extra computation of each layout, not network
cost; read the collective counts and sizes for that.
"""

import argparse
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from banax import DEQ
from banax.nn import MLPCell, TransformerCell
from banax.parallel import (
    Gathered,
    PerShardSolve,
    device_mesh,
    fsdp_specs,
    mlp_cell_specs,
    replicated_specs,
    shard,
    shard_batch,
    transformer_cell_specs,
)
from hlo_collectives import collectives, describe

FEATURES, HIDDEN, INJECT, BATCH = 256, 1024, 64, 32
DIM, HEADS, FF, LENGTH, SEQUENCES = 64, 8, 256, 16, 8
optimizer = optax.adam(1e-3)


class Model(eqx.Module):
    deq: Any
    head: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        # The read-out of an MLPCell's state per sample, of a transformer's per position.
        return self.deq(x) @ self.head


def loss_fn(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def step(model: Model, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = optimizer.update(grads, opt_state)
    return eqx.apply_updates(model, updates), opt_state, loss


def forward_steps(model: Model, x: jax.Array) -> int:
    deq = model.deq
    _, solution = eqx.filter_jit(lambda d, x: d(x, return_solution=True))(deq, x)
    return int(jnp.max(solution.stats.steps))


def layouts(model: Model) -> dict[str, tuple]:
    """Per layout: (mesh or None, parameter specs, wrapper of the DEQ)."""
    if jax.device_count() == 1:
        return {"one device": (None, None, None)}
    data = device_mesh({"data": -1})
    grid = device_mesh({"data": -1, "model": 4})
    return {
        "one device": (None, None, None),
        "data parallel": (data, replicated_specs(model), None),
        "FSDP": (data, fsdp_specs(model, data), lambda d: Gathered(d, data)),
        "FSDP, no Gathered": (data, fsdp_specs(model, data), None),
        "per-shard solves": (data, replicated_specs(model), lambda d: PerShardSolve(d, data)),
        "data x model (2 x 4)": (grid, mlp_cell_specs(model, grid), None),
    }


def transformer_layouts(model: Model) -> dict[str, tuple]:
    if jax.device_count() == 1:
        return {"transformer, one device": (None, None, None)}
    grid = device_mesh({"data": -1, "model": 4})
    return {
        "transformer, one device": (None, None, None),
        "transformer, 2 x 4 heads": (grid, transformer_cell_specs(model, grid), None),
    }


def time_layouts(model: Model, x: jax.Array, y: jax.Array, layouts: dict,
                 repeats: int) -> None:
    for name, (mesh, specs, wrap) in layouts.items():
        placed, xs, ys = model, x, y
        if mesh is not None:
            placed = shard(model, mesh, specs)
            if wrap is not None:
                placed = eqx.tree_at(lambda m: m.deq, placed, wrap(placed.deq))
            xs, ys = shard_batch(mesh, (x, y))
        opt_state = optimizer.init(eqx.filter(placed, eqx.is_inexact_array))
        compiled = eqx.filter_jit(step).lower(placed, opt_state, xs, ys).compile()
        report = collectives(compiled.compiled.as_text())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(placed, opt_state, xs, ys))
            times.append(time.perf_counter() - start)
        print(f"{name:24s} {1e3 * np.median(times):7.1f} ms  {describe(report)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--transformer-only", action="store_true",
                        help="skip the MLPCell layouts")
    args = parser.parse_args()
    kc, kh, kx, ky = jax.random.split(jax.random.key(0), 4)
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-6, "max_steps": 100}
    model = Model(DEQ(MLPCell(FEATURES, INJECT, hidden_features=HIDDEN, key=kc),
                      solver=solver, adjoint="implicit"),
                  jax.random.normal(kh, (FEATURES,)) / 16)
    x = jax.random.normal(kx, (BATCH, INJECT))
    y = jax.random.normal(ky, (BATCH,))
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; batch {BATCH}, "
          f"MLPCell({FEATURES}, hidden {HIDDEN}); forward steps {forward_steps(model, x)}")
    if not args.transformer_only:
        time_layouts(model, x, y, layouts(model), args.repeats)
    kc, kh, kx, ky = jax.random.split(jax.random.key(1), 4)
    cell = TransformerCell(DIM, HEADS, FF, LENGTH, key=kc)
    # The residual branches make the cell close to the identity: a looser tolerance,
    # and more steps for the backward solve.
    solver = {**solver, "rtol": 1e-4}
    adjoint = {"name": "implicit", "b_solver": {**solver, "max_steps": 300}}
    model = Model(DEQ(cell, solver=solver, adjoint=adjoint),
                  jax.random.normal(kh, (DIM,)) / 8)
    x = jax.random.normal(kx, (SEQUENCES, LENGTH, DIM))
    y = jax.random.normal(ky, (SEQUENCES, LENGTH))
    print(f"TransformerCell({DIM}, {HEADS} heads, hidden {FF}), {SEQUENCES} sequences of "
          f"{LENGTH}; forward steps {forward_steps(model, x)}")
    time_layouts(model, x, y, transformer_layouts(model), args.repeats)


if __name__ == "__main__":
    main()
