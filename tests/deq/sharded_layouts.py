"""One DEQ training step in each multi-device layout against the same step on one device.

Run by `test_sharding.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and `PYTHONPATH=tests:benchmarks`
(the device count is fixed when JAX starts, so every layout runs in this one process).
`multiprocess_worker.py` reuses its model and step on two processes.
Prints one JSON line: per layout the largest relative difference of the gradients and
of the parameters after one Adam step from the one-device step, the collectives of the
compiled step inside and outside the solver's loops, and the per-device shard sizes;
then the message of each bad input.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from banax import DEQ  # noqa: E402
from banax.nn import MLPCell, TransformerCell  # noqa: E402
from banax.parallel import (  # noqa: E402
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
from deq.deq_cells import Regressor, mse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from hlo_collectives import collectives  # noqa: E402

FEATURES, INJECT, HIDDEN, BATCH = 8, 4, 16, 16
# The transformer: 4 heads of 2 features, a sequence of 4 positions, 4 sequences.
DIM, HEADS, FF, LENGTH, SEQUENCES = 8, 4, 16, 4, 4
optimizer = optax.adam(1e-2)


def make_model(dtype: Any, rtol: float) -> Regressor:
    kc, kh = jax.random.split(jax.random.key(7))
    solver = {"name": "anderson", "batch_axis": 0, "rtol": rtol, "max_steps": 200}
    # The implicit adjoint's backward solver is the forward one, per sample too.
    deq = DEQ(MLPCell(FEATURES, INJECT, hidden_features=HIDDEN, key=kc, dtype=dtype),
              solver=solver, adjoint="implicit")
    return Regressor(deq, jax.random.normal(kh, (FEATURES,), dtype))


def make_transformer() -> Regressor:
    kc, kh = jax.random.split(jax.random.key(0), 4)[:2]
    cell = TransformerCell(DIM, HEADS, FF, LENGTH, key=kc, dtype=jnp.float64)
    # Halved weights: every sample's solve converges, slowly (the residual branches
    # make the cell close to the identity), so an error of the tolerance's size grows in
    # the fixed point; rtol 1e-13 keeps the gradient and Adam's step within 1e-10.
    cell = eqx.tree_at(lambda c: (c.qkv, c.out, c.ff_in, c.ff_out), cell,
                       replace_fn=lambda w: w / 2)
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-13, "max_steps": 400}
    return Regressor(DEQ(cell, solver=solver, adjoint="implicit"),
                     jax.random.normal(kh, (DIM,), jnp.float64))


def make_step(optimizer: optax.GradientTransformation) -> Callable:
    def step(model: Regressor, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        (loss, _), grads = eqx.filter_value_and_grad(mse, has_aux=True)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss, grads

    return step


step = make_step(optimizer)
# The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by
# all keys), so each run's is roundoff; Adam's first update lr·g/(|g| + eps) scales that
# by lr/eps (1e6 with the default eps). eps = 1e-3 keeps the parameters' difference near
# 1e-11, whatever the compiled arithmetic's last bits.
transformer_optimizer = optax.adam(1e-2, eps=1e-3)
transformer_step = make_step(transformer_optimizer)


def arrays(tree: Any) -> list[jax.Array]:
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def difference(a: Any, b: Any) -> float:
    """The largest over leaves of max |a − b| / max |b|."""
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
               for u, v in zip(arrays(a), arrays(b), strict=True))


def device_share(tree: Any) -> float:
    """The fraction of the tree's elements that device 0 holds."""
    leaves = arrays(tree)
    mine = sum(s.data.size for a in leaves for s in a.addressable_shards
               if s.device == jax.devices()[0])
    return mine / sum(a.size for a in leaves)


def run_layout(one: tuple, model: Regressor, opt_state: Any, x: jax.Array,
               y: jax.Array, run: bool = True, step: Callable = step) -> dict[str, Any]:
    compiled = eqx.filter_jit(step).lower(model, opt_state, x, y).compile()
    hlo = collectives(compiled.compiled.as_text())  # eqx wraps jax.stages.Compiled
    report = {"inside": dict(hlo.inside), "outside": dict(hlo.outside),
              "inside_sizes": {k: hlo.inside_sizes(k) for k in hlo.inside}}
    if run:
        new_model, new_opt, _, grads = compiled(model, opt_state, x, y)
        report.update(grads=difference(grads, one[3]), params=difference(new_model, one[0]),
                      param_share=device_share(new_model), opt_share=device_share(new_opt))
    return report


def message(thunk: Callable[[], Any]) -> str:
    try:
        thunk()
    except ValueError as error:
        return str(error)
    return "accepted"


class BatchMeanCell(eqx.Module):
    """An MLPCell plus the batch mean of its state: it mixes samples."""

    inner: MLPCell

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return self.inner(z, x) + jnp.broadcast_to(jnp.mean(z, axis=0), z.shape) / 4

    def zero_state(self, x: jax.Array) -> jax.Array:
        return self.inner.zero_state(x)


def main() -> None:
    report: dict[str, Any] = {"devices": jax.device_count()}
    kx, ky = jax.random.split(jax.random.key(1))
    x64 = jax.random.normal(kx, (BATCH, INJECT), jnp.float64)
    y64 = jax.random.normal(ky, (BATCH,), jnp.float64)
    data = device_mesh({"data": 8})
    grid = device_mesh({"data": 2, "model": 4})

    for dtype, rtol in ((jnp.float64, 1e-11), (jnp.float32, 1e-6)):
        name = jnp.dtype(dtype).name
        x, y = x64.astype(dtype), y64.astype(dtype)
        model = make_model(dtype, rtol)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        one = eqx.filter_jit(step)(model, opt_state, x, y)

        def layout(mesh, specs, wrap=lambda deq: deq, run=True, model=model, x=x, y=y,
                   one=one):
            placed = shard(model, mesh, specs)
            placed = eqx.tree_at(lambda m: m.deq, placed, wrap(placed.deq))
            opt = optimizer.init(eqx.filter(placed, eqx.is_inexact_array))
            xs, ys = shard_batch(mesh, (x, y))
            return run_layout(one, placed, opt, xs, ys, run)

        fsdp = fsdp_specs(model, data)
        report[f"fsdp_{name}"] = layout(data, fsdp, lambda d: Gathered(d, data))
        if dtype == jnp.float32:
            continue
        report["data"] = layout(data, replicated_specs(model))
        report["fsdp_ungathered"] = layout(data, fsdp, run=False)
        report["tp"] = layout(grid, mlp_cell_specs(model, grid))
        report["per_shard"] = layout(data, replicated_specs(model),
                                     lambda d: PerShardSolve(d, data))
        w1 = shard(model, grid, mlp_cell_specs(model, grid)).deq.cell.W1
        report["tp_w1_shard"] = list(w1.addressable_shards[0].data.shape)

    # The transformer split by heads over "model", its sequences over "data".
    transformer = make_transformer()
    kx, ky = jax.random.split(jax.random.key(0), 4)[2:]
    x = jax.random.normal(kx, (SEQUENCES, LENGTH, DIM), jnp.float64)
    y = jax.random.normal(ky, (SEQUENCES, LENGTH), jnp.float64)
    opt_state = transformer_optimizer.init(eqx.filter(transformer, eqx.is_inexact_array))
    one = eqx.filter_jit(transformer_step)(transformer, opt_state, x, y)
    placed = shard(transformer, grid, transformer_cell_specs(transformer, grid))
    opt_state = transformer_optimizer.init(eqx.filter(placed, eqx.is_inexact_array))
    report["transformer"] = run_layout(one, placed, opt_state, *shard_batch(grid, (x, y)),
                                       step=transformer_step)
    report["transformer_shards"] = {
        name: list(getattr(placed.deq.cell, name).addressable_shards[0].data.shape)
        for name in ("qkv", "qkv_bias", "out", "position_bias", "ff_in", "ff_out",
                     "out_bias")}

    model = make_model(jnp.float64, 1e-11)
    per_shard = PerShardSolve(model.deq, data)
    mixing = PerShardSolve(eqx.tree_at(lambda d: d.cell, model.deq,
                                       BatchMeanCell(model.deq.cell)), data)
    report["errors"] = {
        "axis": message(lambda: fsdp_specs(model, data, axis="model")),
        "indivisible": message(lambda: shard(jnp.ones(12), data, P("data"))),
        "tp_indivisible": message(lambda: mlp_cell_specs(
            Regressor(DEQ(MLPCell(8, 4, hidden_features=6, key=jax.random.key(0)),
                          solver="picard"), jnp.ones(8)), grid)),
        "heads_indivisible": message(lambda: transformer_cell_specs(
            DEQ(TransformerCell(8, 2, 16, 4, key=jax.random.key(0)), solver="picard"),
            grid)),
        "batch": message(lambda: per_shard(x64[:12])),
        "mixing": message(lambda: mixing.check_samples_apart(x64)),
        "apart": message(lambda: per_shard.check_samples_apart(x64)),
        "mesh": message(lambda: device_mesh({"data": 3})),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
