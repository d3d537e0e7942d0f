"""Data parallelism: split a batch over the devices of a mesh, replicate a model.

A DEQ in batch mode keeps every sample's solve independent (its own residual,
stopping and mixing), so sharding the batch axis over devices changes nothing but
where the work runs: put the batch on `NamedSharding(mesh, P("data"))`, the model on
`NamedSharding(mesh, P())`, and `eqx.filter_jit` the training step. XLA then runs the
cell on each device's slice, turns the loop's "all samples converged?" test and the
gradient's batch sum into cross-device reductions, and keeps the output sharded.
See `docs/multi_device.md` for several GPUs and several hosts.
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(axis_name: str = "data") -> Mesh:
    """A one-axis mesh over every device of every process, for data parallelism.

    Its axis is of JAX's automatic kind (`jax.make_mesh` makes explicit axes by
    default, under which every array's sharding becomes part of its type), so that
    `eqx.filter_jit` propagates the batch sharding through the solver's loop on its
    own.
    """
    return Mesh(np.asarray(jax.devices()), (axis_name,))


def shard_batch(mesh: Mesh, batch: Any, axis_name: str = "data") -> Any:
    """Place `batch` on `mesh`, split along each array's leading axis over `axis_name`.

    With one process, `batch` is the whole batch. With several processes (after
    `jax.distributed.initialize()`), each process passes its own slice and the global
    batch is their concatenation in process order, so every host loads only its data.

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh`, e.g. `data_mesh()`.
    - `batch`: a pytree of arrays, all with the batch on axis 0; other leaves are
        left as they are.
    - `axis_name`: the mesh axis to split the batch over.

    The leading size of every array must be divisible by the number of this
    process's devices along `axis_name`; drop or pad the last, smaller batch.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"shard_batch: axis_name={axis_name!r} is not an axis of the mesh, whose "
            f"axes are {mesh.axis_names}."
        )
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    axis = mesh.axis_names.index(axis_name)
    local = {d.id for d in jax.local_devices()}
    # The number of distinct slices this process holds along the batch axis.
    parts = len({index[axis] for index, d in np.ndenumerate(mesh.devices) if d.id in local})
    multi_process = jax.process_count() > 1

    def put(x: Any) -> Any:
        if not eqx.is_array(x):
            return x
        if x.ndim == 0 or x.shape[0] % parts:
            raise ValueError(
                f"shard_batch: every array must have a leading batch axis divisible by "
                f"the {parts} device(s) of this process on mesh axis {axis_name!r}; got "
                f"shape {x.shape}. Drop or pad the last batch."
            )
        if multi_process:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """A copy of `tree` whose arrays are replicated on every device of `mesh` (for
    parameters and optimizer state); non-array leaves are kept as they are."""
    return eqx.filter_shard(tree, NamedSharding(mesh, PartitionSpec()))
