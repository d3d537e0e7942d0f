"""One data-parallel DEQ training step on 8 devices against the same step on one.

Run by `test_sharding.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (the device count is fixed when
JAX starts), and `PYTHONPATH=tests`. Prints one JSON line with what the test checks.
"""

import json

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from banax import DEQ, FixedPointCache  # noqa: E402
from banax.parallel import data_mesh, replicate, shard_batch  # noqa: E402
from deq.deq_cells import Regressor, mse, tanh_cell  # noqa: E402
from helpers import tree_allclose  # noqa: E402

N, D, BATCH = 12, 6, 32


def cached_solves(deq, x, index, cache):
    """A cold solve that fills `cache`, then a warm one started from it: the two caches
    and the two step counts (per sample)."""

    @eqx.filter_jit
    def solve(deq, x, index, cache):
        z, sol = deq(x, z0=cache.read(index, deq.initial_state(x)), return_solution=True)
        return cache.write(index, z), sol.stats.steps

    cold_cache, cold_steps = solve(deq, x, index, cache)
    warm_cache, warm_steps = solve(deq, x, index, cold_cache)
    return cold_cache, warm_cache, cold_steps, warm_steps


def main() -> None:
    kc, kh, kx, ky = jax.random.split(jax.random.key(3), 4)
    deq = DEQ(
        tanh_cell(kc, N, D, radius=0.9),
        # Picard compiles fastest; the sharding logic is the same for every solver.
        solver={"name": "picard", "batch_axis": 0, "rtol": 1e-11, "max_steps": 400},
        adjoint={"name": "implicit",
                 "b_solver": {"name": "picard", "rtol": 1e-11, "max_steps": 400}},
        state_shape=(N,),
    )
    model = Regressor(deq, jax.random.normal(kh, (N,)))
    x = jax.random.normal(kx, (BATCH, D))
    y = jax.random.normal(ky, (BATCH,))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        (loss, z), grads = eqx.filter_value_and_grad(mse, has_aux=True)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), loss, grads, z

    one = train_step(model, opt_state, x, y)

    mesh = data_mesh()
    xs, ys = shard_batch(mesh, (x, y))
    many = train_step(replicate(mesh, model), replicate(mesh, opt_state), xs, ys)
    z = many[3]
    try:
        shard_batch(mesh, x[:30])
        uneven = "accepted"
    except ValueError as error:
        uneven = str(error)
    # The fixed-point cache, replicated, read and written by a batch sharded over the
    # devices (in shuffled example order), against the same on one device.
    index = jax.random.permutation(jax.random.key(4), 2 * BATCH)[:BATCH]
    cache = FixedPointCache.empty(2 * BATCH, (N,), x.dtype)
    cached_one = cached_solves(deq, x, index, cache)
    cached_many = cached_solves(replicate(mesh, deq), xs, shard_batch(mesh, index),
                                replicate(mesh, cache))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    print(json.dumps({
        "devices": jax.device_count(),
        "input_sharded": xs.sharding.is_equivalent_to(batch_sharding, xs.ndim),
        "output_sharded": z.sharding.is_equivalent_to(batch_sharding, z.ndim),
        "output_devices": len(z.sharding.device_set),
        "loss": [float(one[1]), float(many[1])],
        "same_grads": tree_allclose(one[2], many[2], rtol=1e-9, atol=1e-12),
        "same_update": tree_allclose(
            eqx.filter(one[0], eqx.is_array), eqx.filter(many[0], eqx.is_array),
            rtol=1e-9, atol=1e-12,
        ),
        "same_output": tree_allclose(one[3], z, rtol=1e-9, atol=1e-12),
        "grad_norm": float(jnp.linalg.norm(one[2].deq.cell.W)),
        "uneven_batch": uneven,
        "same_caches": all(
            tree_allclose(one_cache.values, many_cache.values, rtol=1e-9, atol=1e-12)
            and bool(jnp.all(one_cache.filled == many_cache.filled))
            for one_cache, many_cache in zip(cached_one[:2], cached_many[:2])),
        "cache_replicated": cached_many[1].values.sharding.is_fully_replicated,
        "cache_filled": int(jnp.sum(cached_many[1].filled)),
        "cold_steps": [int(jnp.max(cached_one[2])), int(jnp.max(cached_many[2]))],
        "warm_steps": [int(jnp.max(cached_one[3])), int(jnp.max(cached_many[3]))],
    }))


if __name__ == "__main__":
    main()
