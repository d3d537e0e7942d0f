"""`Graph` and `GraphCell`: the implicit graph network cell (Gu et al., IGNN, 2020)."""

import math
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental import sparse
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._cell import AbstractCell
from ._conv_cell import check_int

# Power iteration for ρ(|A|): stop when the Collatz–Wielandt bounds agree to this
# relative gap, or after this many products (the upper bound is returned either way).
_RHO_RTOL = 1e-4
_RHO_MAX_ITERATIONS = 2000


def _matmul(adjacency: sparse.BCOO, x: Array) -> Array:
    """`A @ x` for an adjacency `(n, n)` and `x` `(n, ·)` or `(B, n, ·)`, or a batch of
    adjacencies `(B, n, n)` and `x` `(B, n, ·)`."""
    n = adjacency.shape[-1]

    # The BCOO is rebuilt from its arrays (in x's dtype), so that the product follows
    # the arrays' batch size: banax's batch-mode checks resize the input's leaves.
    def product(data, indices, xi):
        return sparse.BCOO((data.astype(xi.dtype), indices), shape=(n, n)) @ xi

    if adjacency.n_batch == 1:
        return jax.vmap(product)(adjacency.data, adjacency.indices, x)
    if x.ndim == 2:
        return product(adjacency.data, adjacency.indices, x)
    # One sparse product over the whole batch: the samples become columns.
    cols = jnp.moveaxis(x, 0, 1).reshape(n, -1)
    out = product(adjacency.data, adjacency.indices, cols)
    return jnp.moveaxis(out.reshape(n, x.shape[0], x.shape[2]), 1, 0)


def _perron_root(data: np.ndarray, indices: np.ndarray, n: int) -> float:
    """An upper bound on ρ(|A|) for one graph, tight to `_RHO_RTOL` once power
    iteration converges (numpy, eagerly: this runs once per graph).

    Power iteration on `M = |A| + I` (the shift makes every other eigenvalue smaller
    in modulus than ρ(|A|) + 1, and keeps the iterate positive), with the
    Collatz–Wielandt bounds `min_i (Mx)_i/x_i ≤ ρ(M) ≤ max_i (Mx)_i/x_i`: the upper
    bound is valid at every iterate, so a slowly converging graph only makes the
    projection of `W` a little more conservative, never unsound.
    """
    # BCOO pads its entries with out-of-range indices: drop those.
    keep = np.all(indices < n, axis=1)
    weights, rows, cols = np.abs(data[keep].astype(np.float64)), *indices[keep].T
    x = np.ones(n)
    for _ in range(_RHO_MAX_ITERATIONS):
        mx = np.bincount(rows, weights * x[cols], minlength=n) + x
        ratio = mx / x
        upper, lower = ratio.max(), ratio.min()
        if upper - lower <= _RHO_RTOL * upper:
            break
        x = mx / mx.max()
    return float(upper - 1)


class Graph(eqx.Module):
    """A graph's adjacency matrix `A` (sparse) and its spectral radius `ρ(|A|)`.

    The input of a `GraphCell`. `A` is a `jax.experimental.sparse.BCOO` of shape
    `(nodes, nodes)`, or `(B, nodes, nodes)` with one batch dimension for a batch of
    graphs (`Graph.stack`); `(A Z)_i = Σ_j A_ij Z_j` aggregates node `i`'s
    neighbours. `ρ(|A|)`, the Perron root of `A`'s entrywise absolute value (which
    bounds `A`'s own spectral radius), is computed once here by power iteration (an
    upper bound, tight to about 1e-4), since the cell's well-posedness bound needs it
    at every call. Build it outside `jax.jit` (or with a concrete adjacency) so that
    this happens once per graph rather than once per trace.

    **Arguments:**

    - `adjacency`: the adjacency, a square `BCOO` (`n_batch` 0 or 1) with finite
        entries, usually normalised; `Graph.from_edges` builds the symmetric
        normalisation `D^{-1/2} (A + I) D^{-1/2}` from an edge list.
    - `spectral_radius`: an upper bound on `ρ(|A|)` to use instead of computing it
        (needed when the adjacency is traced, e.g. built inside `jax.jit`).
    """

    adjacency: sparse.BCOO
    spectral_radius: Float[Array, "*batch"]

    def __init__(self, adjacency: sparse.BCOO, *,
                 spectral_radius: ArrayLike | None = None):
        if not isinstance(adjacency, sparse.BCOO):
            raise TypeError(
                f"Graph: adjacency must be a jax.experimental.sparse.BCOO, got "
                f"{type(adjacency).__name__}; convert a dense matrix with "
                "sparse.BCOO.fromdense(a), or build one from an edge list with "
                "Graph.from_edges."
            )
        shape = adjacency.shape
        if adjacency.n_dense != 0 or adjacency.n_sparse != 2 or adjacency.n_batch > 1 \
                or shape[-1] != shape[-2]:
            raise ValueError(
                f"Graph: adjacency must be a square (nodes, nodes) matrix, or a batch "
                f"(B, nodes, nodes) with n_batch=1; got shape {shape} (n_batch="
                f"{adjacency.n_batch}, n_dense={adjacency.n_dense}). Pass one graph's "
                "adjacency, or stack graphs with Graph.stack."
            )
        if not jnp.issubdtype(adjacency.dtype, jnp.floating):
            raise TypeError(
                f"Graph: adjacency must hold floats, got dtype {adjacency.dtype}; use "
                "adjacency.astype(jnp.float32)."
            )
        concrete = not isinstance(adjacency.data, Tracer) \
            and not isinstance(adjacency.indices, Tracer)
        if concrete:
            bad = ~np.isfinite(np.asarray(adjacency.data))
            if bad.any():
                raise ValueError(
                    f"Graph: adjacency has {int(bad.sum())} non-finite entries (NaN or "
                    "inf); the cell's fixed point would not exist. Fix the edge weights "
                    "(e.g. a degree normalisation dividing by a zero degree)."
                )
        self.adjacency = adjacency
        if spectral_radius is None:
            if not concrete:
                raise TypeError(
                    "Graph: the adjacency is traced (built inside jax.jit or "
                    "jax.vmap), so its spectral radius cannot be computed once here; "
                    "build the Graph outside the transformation and pass it in, or "
                    "pass spectral_radius= (an upper bound on ρ(|A|))."
                )
            data, indices = np.asarray(adjacency.data), np.asarray(adjacency.indices)
            n = shape[-1]
            if adjacency.n_batch:
                radii = [_perron_root(d, i, n) for d, i in zip(data, indices)]
            else:
                radii = _perron_root(data, indices, n)
            spectral_radius = np.asarray(radii, adjacency.dtype)
        self.spectral_radius = jnp.asarray(spectral_radius)

    @property
    def num_nodes(self) -> int:
        """The number of nodes."""
        return self.adjacency.shape[-1]

    @classmethod
    def from_edges(cls, senders: Sequence[int] | np.ndarray,
                   receivers: Sequence[int] | np.ndarray, num_nodes: int,
                   *, dtype=None) -> "Graph":
        """The graph of an undirected edge list, with the symmetric normalisation
        `Â = D̃^{-1/2} (A + I) D̃^{-1/2}` (`A` the 0/1 adjacency made symmetric,
        `D̃` the degrees counting the self-loop), whose `ρ(Â) = 1`.

        `senders` and `receivers` are concrete integer arrays of equal length; an edge
        given twice, or in both directions, counts once.
        """
        num_nodes = check_int("Graph.from_edges", "num_nodes", num_nodes)
        s, r = np.asarray(senders), np.asarray(receivers)
        if s.ndim != 1 or r.shape != s.shape or (s.size and (
                not np.issubdtype(s.dtype, np.integer)
                or not np.issubdtype(r.dtype, np.integer))):
            raise ValueError(
                f"Graph.from_edges: senders and receivers must be 1-D integer arrays of "
                f"equal length; got shapes {s.shape} ({s.dtype}) and {r.shape} "
                f"({r.dtype})."
            )
        if s.size and (min(s.min(), r.min()) < 0 or max(s.max(), r.max()) >= num_nodes):
            raise ValueError(
                f"Graph.from_edges: node indices must lie in [0, num_nodes={num_nodes}); "
                f"got senders in [{s.min()}, {s.max()}] and receivers in "
                f"[{r.min()}, {r.max()}]. Raise num_nodes or fix the edge list."
            )
        loops = np.arange(num_nodes)
        pairs = np.unique(np.stack([np.concatenate([s, r, loops]),
                                    np.concatenate([r, s, loops])], axis=1), axis=0)
        degree = np.bincount(pairs[:, 0], minlength=num_nodes).astype(np.float64)
        weights = 1 / np.sqrt(degree[pairs[:, 0]] * degree[pairs[:, 1]])
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        adjacency = sparse.BCOO((jnp.asarray(weights, dtype), jnp.asarray(pairs, jnp.int32)),
                                shape=(num_nodes, num_nodes), indices_sorted=True,
                                unique_indices=True)
        # From the numpy arrays, so that this works under jax.jit too.
        return cls(adjacency, spectral_radius=np.asarray(
            _perron_root(weights, pairs, num_nodes), dtype))

    @classmethod
    def stack(cls, graphs: Sequence["Graph"]) -> "Graph":
        """A batch of graphs with the same number of nodes, one per sample: the input
        of a `GraphCell` in batch mode (`banax.DEQ` with `batch_axis=0` needs every
        array of its input to carry the batch). Edge lists of different lengths are
        padded with zero entries."""
        if not graphs or not all(isinstance(g, Graph) and g.adjacency.n_batch == 0
                                 for g in graphs):
            raise TypeError("Graph.stack: graphs must be a non-empty sequence of "
                            "unbatched Graphs.")
        n = {g.num_nodes for g in graphs}
        if len(n) != 1:
            raise ValueError(f"Graph.stack: every graph must have the same number of "
                             f"nodes; got {sorted(n)}. Pad the smaller graphs with "
                             "isolated nodes.")
        nse = max(g.adjacency.nse for g in graphs)

        def pad(a, width):
            return jnp.pad(a, [(0, width - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

        data = jnp.stack([pad(g.adjacency.data, nse) for g in graphs])
        indices = jnp.stack([pad(g.adjacency.indices, nse) for g in graphs])
        nodes = n.pop()
        adjacency = sparse.BCOO((data, indices), shape=(len(graphs), nodes, nodes))
        return cls(adjacency, spectral_radius=jnp.stack([g.spectral_radius for g in graphs]))


def project_rows_l1(weight: Float[Array, "*wbatch rows cols"],
                    radius: Float[Array, "*rbatch"]) -> Float[Array, "... rows cols"]:
    """The Euclidean projection of each row of `weight` onto the ℓ1 ball of `radius`:
    the nearest matrix with `‖W‖_∞ = max_i Σ_j |W_ij| ≤ radius`.

    A row inside the ball is kept; one outside becomes `sign(w) max(|w| − θ, 0)`,
    the threshold `θ` chosen so that its ℓ1 norm is `radius` (by sorting the row,
    Duchi et al., 2008).
    """
    cols = weight.shape[-1]
    radius = jnp.asarray(radius, weight.dtype)
    shape = jnp.broadcast_shapes(radius.shape, weight.shape[:-2]) + weight.shape[-2:]
    weight = jnp.broadcast_to(weight, shape)
    radius = jnp.broadcast_to(radius[..., None, None], shape[:-2] + (1, 1))
    a = jnp.abs(weight)
    desc = -jnp.sort(-a, axis=-1)
    cumsum = jnp.cumsum(desc, axis=-1)
    k = jnp.broadcast_to(jnp.arange(1, cols + 1, dtype=weight.dtype), desc.shape)
    # The support is a prefix of the sorted row: the largest k with u_k > (Σ_{≤k} u − r)/k.
    support = jnp.sum((desc * k > cumsum - radius).astype(jnp.int32), axis=-1, keepdims=True)
    support = jnp.maximum(support, 1)
    theta = (jnp.take_along_axis(cumsum, support - 1, axis=-1) - radius) \
        / support.astype(weight.dtype)
    shrunk = jnp.sign(weight) * jnp.maximum(a - theta, jnp.zeros((), weight.dtype))
    inside = jnp.sum(a, axis=-1, keepdims=True) <= radius
    return jnp.where(inside, weight, shrunk)


class GraphCell(AbstractCell):
    """The implicit graph network cell: `Z' = φ(A (Z W̃ᵀ + U Ωᵀ))` on node features.

    In the paper's features-by-nodes notation `X' = φ(W̃ X Aᵀ + Ω U Aᵀ)`; here `Z`
    is `(nodes, features)`, one row per node, and the input injection `B(U) = A U Ωᵀ`
    aggregates the node inputs `U` over each neighbourhood like the state.

    **Well-posedness.** `W̃` is `W` projected (row by row, `project_rows_l1`) onto the
    ball `‖W̃‖_∞ ≤ κ / ρ(|A|)`, in the forward pass, with the graph's `ρ` computed
    once (`Graph`). For a componentwise 1-Lipschitz `φ` (relu, tanh) the cell is then
    a contraction with factor `κ` in the weighted norm `max_{i,j} |Z_ij| / v_i`, `v`
    the Perron vector of `|A|`, so the fixed point exists, is unique, and every
    solver reaches it, whatever `W` training makes. The projection is differentiable;
    the optimizer updates `W` itself, which may leave the ball (`projected_weight`
    gives the matrix the cell applies).

    **Shapes.** Called as `cell(z, (graph, u))` with `z` `(nodes, features)` and `u`
    `(nodes, inject_features)`, or with a leading batch axis on both (batch mode,
    `batch_axis=0`): the graph is then one graph shared by the batch, or a batch of
    graphs (`Graph.stack`), one per sample. `banax.DEQ` in batch mode needs the
    latter (every array of its input carries the batch).

    **Arguments:**

    - `features`: the state's features per node.
    - `inject_features`: the input's features per node.
    - `kappa`: the contraction factor `κ` in (0, 1) (default 0.9).
    - `activation`: `"relu"` (the paper's choice, default) or `"tanh"`.
    - `key`: PRNG key for the initial weights (uniform in ±1/√features).
    - `dtype`: the parameters' dtype (default: JAX's default float).
    """

    weight: Float[Array, "features features"]
    inject: Float[Array, "features inject"]
    kappa: float = eqx.field(static=True)
    activation: Literal["relu", "tanh"] = eqx.field(static=True)

    def __init__(self, features: int, inject_features: int, kappa: float = 0.9, *,
                 activation: Literal["relu", "tanh"] = "relu", key: PRNGKeyArray,
                 dtype=None):
        features = check_int("GraphCell", "features", features)
        inject_features = check_int("GraphCell", "inject_features", inject_features)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) \
                or not 0 < kappa < 1:
            raise ValueError(
                f"GraphCell: kappa must be in (0, 1), got {kappa!r}; it bounds the "
                "cell's contraction factor (0.9 is the usual choice)."
            )
        if activation not in ("relu", "tanh"):
            raise ValueError(f"GraphCell: activation must be 'relu' or 'tanh', got "
                             f"{activation!r}.")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        bound = 1 / math.sqrt(features)
        k_w, k_u = jax.random.split(key)
        self.weight = jax.random.uniform(k_w, (features, features), dtype, -bound, bound)
        self.inject = jax.random.uniform(k_u, (features, inject_features), dtype,
                                         -bound, bound)
        self.kappa = float(kappa)
        self.activation = activation

    def projected_weight(self, graph: Graph) -> Float[Array, "*batch features features"]:
        """`W̃`, the weight the cell applies on `graph`: `W` projected onto
        `‖W̃‖_∞ ≤ κ / ρ(|A|)` (one matrix per graph for a batch of graphs)."""
        radius = self.kappa / graph.spectral_radius.astype(self.weight.dtype)
        return project_rows_l1(self.weight, radius)

    def _check(self, z: Array, x: object) -> tuple[Graph, Array]:
        if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], Graph)):
            raise TypeError(
                "GraphCell: x must be a tuple (graph, u) of a banax.nn.Graph and the "
                f"node inputs; got {type(x).__name__}."
            )
        graph, u = x
        features, inject = self.inject.shape
        n = graph.num_nodes
        if z.ndim not in (2, 3) or z.shape[-1] != features or u.ndim != z.ndim \
                or u.shape[:-1] != z.shape[:-1] or u.shape[-1] != inject:
            raise ValueError(
                f"GraphCell: z must be (nodes, {features}) or (N, nodes, {features}) and "
                f"u (nodes, {inject}) or (N, nodes, {inject}) with the same nodes and "
                f"batch; got z of shape {z.shape} and u of shape {u.shape}."
            )
        if z.shape[-2] != n:
            raise ValueError(
                f"GraphCell: the adjacency has {n} nodes but the state has "
                f"{z.shape[-2]} (z of shape {z.shape}); give the graph of these nodes, "
                "or node features with one row per node of the graph."
            )
        batched = graph.adjacency.n_batch == 1
        if batched and (z.ndim != 3 or graph.adjacency.data.shape[0] != z.shape[0]):
            raise ValueError(
                f"GraphCell: a batch of {graph.adjacency.data.shape[0]} graphs needs a "
                f"state (N, nodes, features) with N = {graph.adjacency.data.shape[0]}; got "
                f"z of shape {z.shape}."
            )
        return graph, u

    def __call__(self, z: Float[Array, "*batch nodes features"],
                 x: tuple[Graph, Float[Array, "*batch nodes inject"]],
                 ) -> Float[Array, "*batch nodes features"]:
        graph, u = self._check(z, x)
        weight = self.projected_weight(graph)
        u = u.astype(z.dtype)
        if weight.ndim == 3:  # one weight per graph of the batch
            mixed = jnp.einsum("bnf,bgf->bng", z, weight)
        else:
            mixed = z @ weight.T
        pre = _matmul(graph.adjacency, mixed + u @ self.inject.T)
        act = jax.nn.relu if self.activation == "relu" else jnp.tanh
        return act(pre)

    def zero_state(self, x: tuple[Graph, Float[Array, "*batch nodes inject"]],
                   ) -> Float[Array, "*batch nodes features"]:
        """Zeros of shape `(nodes, features)`, or `(N, nodes, features)` for a batch."""
        _, u = x
        return jnp.zeros((*jnp.shape(u)[:-1], self.weight.shape[0]), self.weight.dtype)
