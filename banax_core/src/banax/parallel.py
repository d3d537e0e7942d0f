"""Data and model parallelism: split a batch, and the model, over a mesh of devices.

A DEQ in batch mode keeps every sample's solve independent (its own residual,
stopping and mixing), so sharding the batch axis over devices changes nothing but
where the work runs: put the batch on `NamedSharding(mesh, P("data"))`, the model on
`NamedSharding(mesh, P())`, and `eqx.filter_jit` the training step. XLA then runs the
cell on each device's slice, turns the loop's "all samples converged?" test and the
gradient's batch sum into cross-device reductions, and keeps the output sharded.

When the parameters must be split too, a partition spec tree (one `PartitionSpec` per
array of the model) says where each lives: `fsdp_specs` (every parameter split over
the data axis; wrap the DEQ in `Gathered` to gather it once per call),
`tensor_parallel_specs` / `mlp_cell_specs` / `transformer_cell_specs` (hidden units or
attention heads split over a model axis), and
`shard` places a model by them. `PerShardSolve` solves each data shard on its own, with
no communication inside the solver's loops. See `docs/multi_device.md`.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Public names (this module is not imported by the package's __init__).
from . import DEQ, Solution
from .extend import bind
from .nn import MLPCell, TransformerCell


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


# Model parallelism: where each parameter lives, and solves that keep the loop local.
#
# A partition spec tree has the structure of the model: a `PartitionSpec` for every
# array leaf, `None` elsewhere. `shard` places a tree by such specs; the builders below
# write them for the usual layouts.


def device_mesh(axes: Mapping[str, int] | None = None) -> Mesh:
    """A mesh over every device of every process, with named axes of given sizes.

    `device_mesh({"data": 2, "model": 4})` on 8 devices is a 2 × 4 grid; one size
    may be `-1` for "the rest" (`{"data": -1, "model": 4}`). The default is one axis
    `"data"` over all devices (as `data_mesh()`). Axes are of JAX's automatic kind, as
    in `data_mesh`, and the device order is JAX's (`jax.make_mesh`), which puts the
    last axis on the most closely connected devices: give the model axis last.
    """
    axes = {"data": -1} if axes is None else dict(axes)
    count = jax.device_count()
    sizes = list(axes.values())
    if not axes or sizes.count(-1) > 1 or any(
            not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
        raise ValueError(
            f"device_mesh: axes must map axis names to positive sizes, at most one of "
            f"them -1 (the rest of the devices); got {axes}."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and count % known == 0:
        sizes[sizes.index(-1)] = count // known
    if math.prod(sizes) != count:
        raise ValueError(
            f"device_mesh: the axis sizes {axes} must multiply to the {count} devices."
        )
    names = tuple(axes)
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def _check_axis(where: str, mesh: Mesh, axis: str) -> int:
    """The size of mesh axis `axis`, which must exist."""
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{where}: axis {axis!r} is not an axis of the mesh, whose axes are "
            f"{mesh.axis_names}; name one of them or build the mesh with it "
            f"(device_mesh({{..., {axis!r}: size}}))."
        )
    return mesh.shape[axis]


def replicated_specs(tree: Any) -> Any:
    """`PartitionSpec()` (a full copy on every device) for every array of `tree`."""
    return jax.tree.map(lambda a: PartitionSpec() if eqx.is_array(a) else None, tree)


def _split(spec: PartitionSpec, ndim: int, dim: int, axis: str) -> PartitionSpec:
    """`spec` (padded to `ndim` entries) with dimension `dim` also split over `axis`."""
    entries = list(spec) + [None] * (ndim - len(spec))
    old = entries[dim]
    old = () if old is None else (old,) if isinstance(old, str) else tuple(old)
    entries[dim] = (*old, axis) if old else axis
    return PartitionSpec(*entries)


def _parts(mesh: Mesh, entry: Any) -> int:
    """Into how many parts a spec entry (None, an axis name or names) cuts a dimension."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def fsdp_specs(tree: Any, mesh: Mesh, axis: str = "data", specs: Any = None) -> Any:
    """Fully-sharded data parallelism: split every parameter over the data axis too.

    Each array is split along its first dimension that the axis divides (after any
    split already in `specs`, e.g. `tensor_parallel_specs`, which this extends for a
    2-D layout); an array with no such dimension (a scalar, an odd-sized bias) stays
    whole. Each device then holds about `1/size` of the parameters and, once the
    optimizer state is initialised from them, of the optimizer state. Wrap the DEQ in
    `Gathered` so that its solve gathers the parameters once, not per iteration.
    """
    size = _check_axis("fsdp_specs", mesh, axis)
    specs = replicated_specs(tree) if specs is None else specs

    def split(leaf: Any, spec: Any) -> Any:
        if not eqx.is_array(leaf):
            return spec
        padded = list(spec) + [None] * (leaf.ndim - len(spec))
        for dim, n in enumerate(leaf.shape):
            if n % (_parts(mesh, padded[dim]) * size) == 0:
                return _split(spec, leaf.ndim, dim, axis)
        return spec

    return jax.tree.map(split, tree, specs, is_leaf=lambda s: s is None)


Rule = int | tuple[int, int]
"""Which dimension of a parameter to split: `dim`, or `(dim, unit)` to cut it only
between blocks of `unit` entries (e.g. `(0, head_dim)` keeps attention heads whole)."""


def tensor_parallel_specs(
    tree: Any, mesh: Mesh, rules: Mapping[type, Mapping[str, Rule]], axis: str = "model",
) -> Any:
    """Split parameters of chosen module types over the model axis (Megatron style).

    `rules` maps a module type to `{field: rule}`, where `field` is an attribute path
    (`"W1"`, `"attn.query.weight"`) and `rule` the dimension to split (see `Rule`).
    Every instance of the type in `tree` is split so; every other array is replicated.
    For a cell `z' = g(W₂ σ(W₁ z + …))`, split `W₁` by rows (its outputs: column
    parallel) and `W₂` by columns (its inputs: row parallel): each device then computes
    its slice of the hidden units without communication, and the product with `W₂`
    ends in one all-reduce over the model axis, after which the state is whole on every
    device. The solver's per-sample norms and Anderson's Gram products then need no
    further communication. `mlp_cell_specs` is this for `banax.nn.MLPCell`.
    """
    size = _check_axis("tensor_parallel_specs", mesh, axis)
    types = tuple(rules)

    def module_specs(node: Any) -> Any:
        specs = replicated_specs(node)
        if not isinstance(node, types):
            return specs
        rule_set = next(rules[t] for t in types if isinstance(node, t))
        for field, rule in rule_set.items():
            dim, unit = (rule, 1) if isinstance(rule, int) else rule
            get = _getter(field)
            try:
                leaf = get(node)
            except AttributeError:
                raise ValueError(
                    f"tensor_parallel_specs: {type(node).__name__} has no array "
                    f"{field!r}; the rules name its fields, e.g. 'W1' or 'attn.query.weight'."
                ) from None
            if not eqx.is_array(leaf) or not 0 <= dim < leaf.ndim:
                raise ValueError(
                    f"tensor_parallel_specs: {type(node).__name__}.{field} has no "
                    f"dimension {dim} to split (it is {getattr(leaf, 'shape', leaf)})."
                )
            if leaf.shape[dim] % (unit * size):
                raise ValueError(
                    f"tensor_parallel_specs: {type(node).__name__}.{field} of shape "
                    f"{leaf.shape} cannot be split over the {size} devices of axis "
                    f"{axis!r}: dimension {dim} ({leaf.shape[dim]}"
                    + (f" = {leaf.shape[dim] // unit} blocks of {unit}" if unit > 1 else "")
                    + f") is not divisible by {size}. Resize it or use a smaller axis."
                )
            specs = eqx.tree_at(get, specs, _split(PartitionSpec(), leaf.ndim, dim, axis))
        return specs

    return jax.tree.map(module_specs, tree, is_leaf=lambda n: isinstance(n, types))


def _getter(path: str) -> Callable[[Any], Any]:
    def get(node: Any) -> Any:
        for name in path.split("."):
            node = getattr(node, name)
        return node

    return get


MLP_CELL_RULES: dict[str, Rule] = {"W1": 0, "U": 0, "b1": 0, "W2": 1}
"""`banax.nn.MLPCell` split by hidden units: `W₁`, `U`, `b₁` by rows, `W₂` by columns."""


def mlp_cell_specs(tree: Any, mesh: Mesh, axis: str = "model") -> Any:
    """Tensor parallelism for every `banax.nn.MLPCell` of `tree` (see
    `tensor_parallel_specs`): the hidden units are split over `axis`, one all-reduce
    of the state per cell evaluation; everything else is replicated."""
    return tensor_parallel_specs(tree, mesh, {MLPCell: MLP_CELL_RULES}, axis)


TRANSFORMER_CELL_RULES: dict[str, Rule] = {
    "qkv": 1, "inject": 1, "qkv_bias": 1, "position_bias": 0, "out": 0,
    "ff_in": 1, "ff_in_bias": 0, "ff_out": 0,
}
"""`banax.nn.TransformerCell` split by heads and feed-forward hidden units: the query,
key, value and injection projections, their biases and the position bias along their
heads axis, the output projection by its input heads (row parallel), `W₁` and `b₁` by
hidden units, `W₂` by its input rows. Layer norms and the output biases stay whole."""


def transformer_cell_specs(tree: Any, mesh: Mesh, axis: str = "model") -> Any:
    """Tensor parallelism for every `banax.nn.TransformerCell` of `tree` (see
    `tensor_parallel_specs`), Megatron style: each device attends with its own heads
    and computes its own slice of the feed-forward block; the sum over heads after the
    output projection and the product with `W₂` each end in one all-reduce of the state
    over `axis`, two per cell evaluation. The number of heads and the feed-forward
    width must be divisible by the size of `axis`."""
    size = _check_axis("transformer_cell_specs", mesh, axis)
    is_cell = lambda n: isinstance(n, TransformerCell)  # noqa: E731
    for cell in filter(is_cell, jax.tree.leaves(tree, is_leaf=is_cell)):
        heads, hidden = cell.out.shape[0], cell.ff_in.shape[1]
        if heads % size or hidden % size:
            raise ValueError(
                f"transformer_cell_specs: a TransformerCell with {heads} heads and "
                f"feed-forward width {hidden} cannot be split over the {size} devices of "
                f"axis {axis!r}: both must be divisible by {size}; change heads or "
                f"hidden, or use a model axis whose size divides both."
            )
    rules = {TransformerCell: TRANSFORMER_CELL_RULES}
    return tensor_parallel_specs(tree, mesh, rules, axis)


def _check_specs(mesh: Mesh, tree: Any, specs: Any) -> None:
    def check(leaf: Any, spec: Any) -> None:
        if not eqx.is_array(leaf) or spec is None:
            return
        if len(spec) > leaf.ndim:
            raise ValueError(
                f"shard: the spec {spec} has more entries than the array of shape "
                f"{leaf.shape} has dimensions."
            )
        for dim, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            for name in names:
                _check_axis("shard", mesh, name)
            parts = _parts(mesh, entry)
            if leaf.shape[dim] % parts:
                raise ValueError(
                    f"shard: dimension {dim} of an array of shape {leaf.shape} "
                    f"({leaf.shape[dim]}) is not divisible by the {parts} devices of "
                    f"mesh axis {entry!r} (spec {spec}); resize it or leave it whole."
                )

    jax.tree.map(check, tree, specs, is_leaf=lambda s: s is None)


def shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Place the arrays of `tree` on `mesh` by a partition spec tree of the same
    structure (from `replicated_specs`, `fsdp_specs`, `tensor_parallel_specs`, ...).

    Works outside `jit` (placement) and inside (a sharding constraint). With several
    processes every process passes the same whole values (one PRNG key: one model).
    """
    _check_specs(mesh, tree, specs)
    shardings = jax.tree.map(
        lambda s: None if s is None else NamedSharding(mesh, s), specs,
        is_leaf=lambda s: s is None or isinstance(s, PartitionSpec))
    return jax.tree.map(
        lambda a, s: eqx.filter_shard(a, s) if eqx.is_array(a) and s is not None else a,
        tree, shardings, is_leaf=lambda s: s is None)


class _PinnedCell(eqx.Module):
    """A cell whose new state is constrained to stay split by batch over a mesh axis.

    Inside the solver's loop nothing else says where the state lives, and XLA's
    partitioner may move it between layouts at every iteration (all-to-alls of the
    state); the constraint costs nothing when the state already lies so.
    """

    cell: Any
    sharding: NamedSharding = eqx.field(static=True)

    def __call__(self, z: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.cell(z, x, *args, **kwargs)
        if args:  # a stateful cell returns (z', state)
            return self._pin(out[0]), out[1]
        return self._pin(out)

    def _pin(self, z: Any) -> Any:
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.sharding), z)

    def zero_state(self, x: Any) -> Any:
        return self.cell.zero_state(x)


class Gathered(eqx.Module):
    """A layer whose parameters are gathered once, at its entry (FSDP's per-layer gather).

    `Gathered(deq, mesh)` behaves as `deq`; inside a jitted step it first constrains
    the layer's arrays to `specs` (default: whole on every device), so the partitioner
    all-gathers FSDP-split parameters once per call, and, for a DEQ in batch mode,
    keeps the state split by batch over mesh axis `axis` at every iteration. The
    solver's loops then run on local copies of the weights and the local samples,
    with no communication but the stopping flags. Without it XLA may keep the weights
    split inside the loop and move the *state* at every iteration instead. The
    gradient flows back through the gather as a reduce-scatter onto the split
    parameters.

    For FSDP on top of tensor parallelism, pass the tensor-parallel specs of the
    layer as `specs`: only the data-axis split is undone.
    """

    layer: Any
    mesh: Mesh = eqx.field(static=True)
    specs: Any = eqx.field(static=True, default=None)
    axis: str | None = eqx.field(static=True, default="data")

    def __check_init__(self):
        if self.axis is not None:
            _check_axis("Gathered", self.mesh, self.axis)
        if self.specs is not None:
            _check_specs(self.mesh, self.layer, self.specs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        specs = replicated_specs(self.layer) if self.specs is None else self.specs
        layer = shard(self.layer, self.mesh, specs)
        if isinstance(layer, DEQ) and layer.solver.batch_axis is not None \
                and self.axis is not None:
            b = layer.solver.batch_axis
            batch = NamedSharding(self.mesh, PartitionSpec(*([None] * b), self.axis))
            layer = eqx.tree_at(lambda d: d.cell, layer, _PinnedCell(layer.cell, batch))
        return layer(*args, **kwargs)


class PerShardSolve(eqx.Module):
    """A batch-mode DEQ whose solve runs on each data shard on its own.

    Under plain data parallelism every iteration of the forward and backward loops
    all-reduces "has every sample converged?" over the devices, and every device steps
    until the slowest sample of the *global* batch converges. `PerShardSolve(deq,
    mesh)` runs the layer inside `jax.shard_map` over the batch axis instead: each
    device solves its own slice of the batch, stops when its own samples have
    converged, and no collective runs inside the solver's loops. The parameters'
    gradient is summed over the shards once, after the backward solve. Since batch
    mode solves each sample on its own, the result is the global solve's, sample for
    sample.

    The layer's parameters enter whole (an FSDP-split layer is gathered at the entry);
    the cell must keep samples apart (`check_samples_apart` checks it).

    **Arguments:**

    - `deq`: a `banax.DEQ` in batch mode (its solver has `batch_axis`).
    - `mesh`: the device mesh.
    - `axis`: the mesh axis the batch is split over.
    """

    deq: Any
    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True, default="data")

    def __check_init__(self):
        _check_axis("PerShardSolve", self.mesh, self.axis)
        if self.deq.solver.batch_axis is None:
            raise ValueError(
                "PerShardSolve: the DEQ's solver has no batch_axis; per-shard solves "
                "need batch mode, e.g. solver={'name': 'anderson', 'batch_axis': 0}."
            )

    def _batch(self, x: Any) -> int:
        axis, parts = self.deq.solver.batch_axis, self.mesh.shape[self.axis]
        sizes = {a.shape[axis] for a in jax.tree.leaves(x) if jnp.ndim(a) > axis}
        if len(sizes) != 1 or next(iter(sizes)) % parts:
            raise ValueError(
                f"PerShardSolve: the batch (axis {axis} of x, sizes {sorted(sizes)}) "
                f"must be one size divisible by the {parts} devices of mesh axis "
                f"{self.axis!r}; drop or pad the last batch."
            )
        return sizes.pop()

    def __call__(self, x: Any, *, key: Any = None, z0: Any = None,
                 return_solution: bool = False) -> Any:
        """`deq(x, key=key, z0=z0, return_solution=...)`, solved shard by shard."""
        self._batch(x)
        b = self.deq.solver.batch_axis
        batch = PartitionSpec(*([None] * b), self.axis)
        params, static = eqx.partition(self.deq, eqx.is_array)

        def local(params, x, key, z0):
            out = eqx.combine(params, static)(x, key=key, z0=z0,
                                              return_solution=return_solution)
            if return_solution:
                z, solution = out
                # Statistics are per sample along their first axis; the trace is none.
                return z, (solution.result, solution.stats)
            return out

        out_specs = (batch, (PartitionSpec(self.axis), PartitionSpec(self.axis))) \
            if return_solution else batch
        # check_vma=False: the loops carry shard-local values that the vma type system
        # cannot follow through the adjoint's custom rules; the transpose still sums the
        # replicated parameters' gradient over the shards.
        solve = jax.shard_map(local, mesh=self.mesh,
                              in_specs=(PartitionSpec(), batch, PartitionSpec(), batch),
                              out_specs=out_specs, check_vma=False)
        out = solve(params, x, key, z0)
        if return_solution:
            z, (result, stats) = out
            return z, Solution(value=z, result=result, stats=stats, trace=None)
        return out

    def check_samples_apart(self, x: Any, *, key: Any = None) -> None:
        """Raise if the cell lets one shard's samples change another shard's.

        One JVP of `z ↦ cell(z, x)` at the initial state with a random tangent on
        sample 0 only; every sample outside the first shard must get a zero tangent.
        A cell that mixes samples (a batch norm, a mean over the batch) would see only
        its shard's samples in a per-shard solve and compute something else than the
        global layer. Call it eagerly, on a real batch, when setting up.
        """
        size = self._batch(x)
        b, parts = self.deq.solver.batch_axis, self.mesh.shape[self.axis]
        z = self.deq.initial_state(x)
        keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(z)))

        def tangent(leaf: Any, k: Any) -> Any:
            noise = jax.random.normal(k, jnp.moveaxis(leaf, b, 0).shape[1:], leaf.dtype)
            one_hot = (jnp.arange(size) == 0).astype(leaf.dtype)
            return jnp.moveaxis(one_hot.reshape(-1, *([1] * noise.ndim)) * noise[None], 0, b)

        tangents = jax.tree.unflatten(
            jax.tree.structure(z), [tangent(a, k) for a, k in zip(jax.tree.leaves(z), keys)])
        _, out = jax.jvp(bind(self.deq.f_spec(x, key)), (z,), (tangents,))
        first = size // parts
        leaked = [bool(jnp.any(jnp.moveaxis(t, b, 0)[first:] != 0))
                  for t in jax.tree.leaves(out)]
        if any(leaked):
            raise ValueError(
                "PerShardSolve: the cell mixes samples across shards (perturbing sample "
                "0 changed samples of other shards), so a per-shard solve would differ "
                "from the global one; remove the coupling (a batch norm: use a layer "
                "norm) or solve globally without PerShardSolve."
            )
