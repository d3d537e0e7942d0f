"""`banax demo --task chains`: node classification on chains, where the class is seen
only at the head of each chain, so a model must carry it along the whole chain.

The data are the synthetic chains of the implicit graph network paper (Gu et al.,
2020): chains of `length` nodes, each of one of two classes; the head node's input
feature is the one-hot class, every other node's input is zero, and every node is
labelled with its chain's class. Half the chains train, half are held out. As in the
paper, a chain is directed, from its head to its tail (`path_graph`). Chains are
disjoint graphs, so each chain is one sample of a batch (its own graph): solving the
batch is solving the union graph, and the DEQ's batch mode stops each chain on its own.

Models (`--model MODEL[:LENGTHS]`, e.g. `--model both:10,20,50,100`):

- `deq`: `banax.nn.GraphCell` (relu, κ = 0.9, `W` starting at `κ I`) to its fixed
  point, each node's state scaled to unit length, a linear read-out (no bias).
- `gcn`: a two-layer graph convolutional network of the same width,
  `Â relu(Â U W₁) W₂`: it sees two hops from each node.
- `unrolled`: the same cell and read-out, the cell applied a fixed `K` times from
  zero and backpropagated (`banax.DEQ(..., pretrain_steps=K)`, `K` the solver's
  `max_steps`): the weight-tied baseline with the DEQ's parameters and its number of
  forward cell applications.
- `both`: `deq` and `gcn`; `all`: the three.

Information moves at most one hop per application of the cell (on average one every
two steps here, see `solve_steps`), so the forward solve needs some `2 × length` steps
to reach the end of a chain: the solves run a fixed `solve_steps(length)` steps unless
`--solver-option` says otherwise. The solver is
Picard unless `--solver` names another (Anderson's mixing breaks down here once the
iterates stop changing in float32).
"""

import argparse
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jaxtyping import Array, Float, PRNGKeyArray

from .._deq import DEQ
from .._solution import BackwardStats, Result, Solution, Stats
from ..nn import Graph, GraphCell
from . import _training
from ._common import adjoint_or_complaint, fail, missing_directory, needs_complaint

MODELS = {"deq": ("deq",), "gcn": ("gcn",), "unrolled": ("unrolled",),
          "both": ("deq", "gcn"), "all": ("deq", "gcn", "unrolled")}
DEFAULT_LENGTHS = (10, 20, 50, 100)
CLASSES = 2
CHAINS = 64  # per class and per split
DEFAULTS = {"epochs": 30, "batch_size": 32, "width": 16}
# A tolerance would stop the forward solve before the far end of a long chain has
# moved, and a chain needs about two steps per hop (`solve_steps`): by default the
# solves run a fixed `2 × length + EXTRA_STEPS` steps.
EXTRA_STEPS = 20
# On the directed chain a node keeps 1/2 of its own state and receives 1/2 of its
# predecessor's, so with W = κ I a signal changes by (κ/2) / (1 − κ/2) per hop: 0.82
# at κ = 0.9 (2e-9 after 100 hops, well inside float32 and above `SIGNAL_FLOOR`),
# 0.98 at κ = 0.99. The paper's κ = 0.9 also makes the tail (its self-loop weighs 1)
# converge like 0.9^steps: the solves reach the fixed point within `solve_steps`,
# where at κ = 0.99 (0.99^steps) they stop short of it.
KAPPA = 0.9
# A state below this carries no usable signal: its readout's cotangent (~1/‖z‖, summed
# backwards over ~1/(1 − κ) steps) must keep the squared residual norms of a
# float32 backward solve over a chain's nodes finite (< 3e38).
SIGNAL_FLOOR = 1e-15


def parse_model(text: str | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`MODEL[:L1,L2,...]` -> the models and the chain lengths."""
    name, colon, lengths = (text or "both").partition(":")
    if name not in MODELS:
        raise ValueError(f"--model {text}: the chains task trains {', '.join(MODELS)}, "
                         "optionally with chain lengths, e.g. --model both:10,20,50")
    if not colon:
        return MODELS[name], DEFAULT_LENGTHS
    try:
        parsed = tuple(int(n) for n in lengths.split(","))
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 2:
        raise ValueError(f"--model {text}: the lengths must be integers >= 2 separated by "
                         "commas, e.g. --model deq:10,20")
    return MODELS[name], parsed


def chains(length: int, chains_per_class: int = CHAINS, seed: int = 0) -> _training.Data:
    """The chains of `length` nodes: inputs `(chains, length, classes)` (the one-hot
    class on the head node, zeros elsewhere), labels `(chains, length)`; the two
    splits hold `chains_per_class` chains of each class, in shuffled order."""
    rng = np.random.default_rng(seed)

    def split():
        labels = np.repeat(np.arange(CLASSES), chains_per_class)[
            rng.permutation(CLASSES * chains_per_class)]
        x = np.zeros((labels.size, length, CLASSES), np.float32)
        x[np.arange(labels.size), 0, labels] = 1.0
        return x, np.repeat(labels[:, None], length, axis=1).astype(np.int32)

    (x_train, y_train), (x_test, y_test) = split(), split()
    return _training.Data(x_train, y_train, x_test, y_test)


def solve_steps(length: int) -> int:
    """The solves' fixed step count for chains of `length` nodes.

    A cell application moves the head's signal one hop with weight κ/2 or keeps it in
    place with weight κ/2, so the part of the fixed point at node `k` arrives after
    a negative-binomial number of steps, of mean ≈ 2k and spread ≈ √(2k): `2 × length`
    plus a margin.
    """
    return 2 * length + EXTRA_STEPS


def path_graph(length: int) -> Graph:
    """One chain, directed as in the paper: node `i` receives from node `i − 1` only.

    The paper's adjacency has the edges `i → i+1` alone (not symmetrised) with its
    normalisation `Â = D̃^{-1/2} (A + I) D̃^{-1/2}`, `D̃` the row sums of `A + I` in its
    own orientation (2 for every node but the tail's 1), and its cell aggregates
    `X Â`: here, one row per node, the transpose `Âᵀ`, lower bidiagonal. Being
    triangular, its eigenvalues are its diagonal (`1/2`, and `1` at the tail), so
    `ρ(|Âᵀ|) = 1` exactly.
    """
    degree = np.full(length, 2.0)
    degree[-1] = 1.0
    nodes = np.arange(length)
    rows = np.concatenate([nodes, nodes[1:]])
    cols = np.concatenate([nodes, nodes[:-1]])
    weights = 1 / np.sqrt(degree[rows] * degree[cols])
    order = np.lexsort((cols, rows))
    adjacency = sparse.BCOO(
        (jnp.asarray(weights[order], jnp.float32),
         jnp.asarray(np.stack([rows, cols], axis=1)[order], jnp.int32)),
        shape=(length, length), indices_sorted=True, unique_indices=True)
    return Graph(adjacency, spectral_radius=np.float32(1.0))


def readout(z: Float[Array, "*batch nodes width"]) -> Float[Array, "*batch nodes width"]:
    """Each node's state scaled to unit ℓ2 norm; a state below `SIGNAL_FLOOR` is zero.

    Far down a long chain the state is tiny (the cell contracts at each hop), so it is
    divided by its largest entry first, which keeps its square from underflowing; the
    result does not depend on that scale, so its gradient is exact with the scale held
    constant. The gradient of a unit vector grows like 1/‖z‖: below the floor it would
    overflow the backward solve's float32 residual norms, so such a node reads as
    carrying no signal.
    """
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(z), axis=-1, keepdims=True))
    signal = scale > SIGNAL_FLOOR
    unit = jnp.where(signal, z / jnp.where(signal, scale, jnp.ones((), z.dtype)),
                     jnp.zeros((), z.dtype))
    # Every kept row has squared norm >= 1; the double `where` keeps the gradient of
    # the zero rows finite.
    squared = jnp.sum(unit**2, axis=-1, keepdims=True)
    return unit / jnp.sqrt(jnp.where(signal, squared, jnp.ones((), z.dtype)))


def _linear(key: PRNGKeyArray, fan_in: int, fan_out: int) -> Array:
    bound = 1 / fan_in**0.5
    return jax.random.uniform(key, (fan_out, fan_in), jnp.float32, -bound, bound)


class ChainsDEQ(eqx.Module):
    """`GraphCell` to its fixed point (or unrolled), then `readout` and a linear head."""

    deq: DEQ
    head: Float[Array, "classes width"]
    length: int = eqx.field(static=True)

    def __init__(self, adjoint: Any, length: int, width: int, *, key: PRNGKeyArray,
                 unroll: int | None = None):
        k_cell, k_head = jax.random.split(key)
        cell = GraphCell(width, CLASSES, kappa=KAPPA, key=k_cell, dtype=jnp.float32)
        # W starts at κ/ρ · I (ρ = 1 here), on the ball's boundary: the cell starts by
        # carrying every feature along the chain, as identity-initialised recurrent
        # networks do. From GraphCell's default random W the relu state dies out some
        # 20 hops down the chain, and training does not bring it back.
        cell = eqx.tree_at(lambda c: c.weight, cell,
                           KAPPA * jnp.eye(width, dtype=jnp.float32))
        self.deq = DEQ(cell, adjoint=adjoint, pretrain_steps=unroll)
        self.head = _linear(k_head, width, CLASSES)
        self.length = length

    def inject(self, x: Float[Array, "batch nodes classes"]) -> tuple[Graph, Array]:
        # Built from numpy (constants under jit), ρ once per trace.
        return Graph.stack([path_graph(self.length)] * x.shape[0]), x

    def __call__(self, x: Float[Array, "batch nodes classes"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Solution]:
        z, solution = self.deq(self.inject(x), backward_probe=backward_probe,
                               return_solution=True)
        return readout(z) @ self.head.T, solution


class ChainsGCN(eqx.Module):
    """A two-layer graph convolutional network `Â relu(Â U W₁ᵀ) W₂ᵀ` (no solve: its
    "solution" reports zero steps)."""

    w1: Float[Array, "width classes"]
    w2: Float[Array, "classes width"]
    length: int = eqx.field(static=True)

    def __init__(self, length: int, width: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.w1, self.w2 = _linear(k1, CLASSES, width), _linear(k2, width, CLASSES)
        self.length = length

    def __call__(self, x: Float[Array, "batch nodes classes"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Solution]:
        a = path_graph(self.length).adjacency
        propagate = jax.vmap(lambda h: a @ h)
        h = jax.nn.relu(propagate(x @ self.w1.T))
        logits = propagate(h @ self.w2.T)
        zeros = jnp.zeros(x.shape[0], jnp.float32)
        stats = Stats(steps=zeros.astype(jnp.int32), abs_err=zeros, rel_err=zeros)
        return logits, Solution(value=None, result=jnp.full(x.shape[0], Result.CONVERGED),
                                stats=stats, trace=None)


def parameter_count(model: eqx.Module) -> int:
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def run(args: argparse.Namespace) -> int:
    """Train each model at each chain length; returns the process exit code."""
    complaint = needs_complaint(args.plot)
    if complaint is not None:
        return complaint
    try:
        models, lengths = parse_model(args.model)
    except ValueError as error:
        return fail(str(error))
    settings = {k: DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                for k in DEFAULTS}
    for name, value in settings.items():
        if value < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    problem = missing_directory("--plot", args.plot)
    if problem:
        return fail(problem)
    results: dict[tuple[str, int], float] = {}
    for length in lengths:
        # The chain needs `length` hops; an explicit --solver-option max_steps wins.
        options = [("max_steps", solve_steps(length)), ("rtol", 0.0), ("atol", 0.0),
                   *args.solver_option]
        adjoint = adjoint_or_complaint(
            argparse.Namespace(**{**vars(args), "solver_option": options,
                                  "adjoint": args.adjoint or "implicit"}), "picard")
        if isinstance(adjoint, int):
            return adjoint
        for model in models:
            results[model, length] = _train(model, length, adjoint, settings, args)
    if len(results) > 1:
        print("test accuracy by chain length (%):")
        print("length " + "".join(f"{m:>10}" for m in models))
        for length in lengths:
            print(f"{length:6d} " + "".join(f"{100 * results[m, length]:10.1f}"
                                            for m in models))
    if args.plot:
        plot_accuracy(results, models, lengths, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build(model: str, length: int, adjoint: Any, width: int, key: PRNGKeyArray) -> Any:
    """The named model for chains of `length` nodes."""
    if model == "gcn":
        return ChainsGCN(length, width, key=key)
    unroll = adjoint.solver.max_steps if model == "unrolled" else None
    return ChainsDEQ(adjoint, length, width, key=key, unroll=unroll)


def _train(model_name: str, length: int, adjoint: Any, settings: dict[str, int],
           args: argparse.Namespace) -> float:
    from tqdm import tqdm

    started, started_cpu = time.perf_counter(), time.process_time()
    data = chains(length, seed=args.seed)
    model = build(model_name, length, adjoint, settings["width"], jax.random.key(args.seed))
    batch = min(settings["batch_size"], len(data.y_train))
    epochs = settings["epochs"]
    steps = epochs * (len(data.y_train) // batch)
    solves = model_name != "gcn"
    solver = (f"solver {type(adjoint.solver).__name__} (max_steps "
              f"{adjoint.solver.max_steps}), adjoint {type(adjoint).__name__}"
              if model_name == "deq" else
              f"{adjoint.solver.max_steps} cell applications, backpropagated"
              if model_name == "unrolled" else "two graph convolutions")
    print(f"chains of length {length}: {model_name}, {parameter_count(model)} parameters, "
          f"{len(data.y_train)} training and {len(data.y_test)} test chains; {solver}")
    bar = tqdm(total=steps, unit="step", desc=f"{model_name} L={length}", file=sys.stderr)

    def report(e: _training.Epoch) -> None:
        stats = (f"  forward steps {e.f_steps:5.1f} residual {e.f_residual:.2e}"
                 if solves else "")
        if model_name == "deq":
            stats += (f"  backward steps {e.b_steps:5.1f} residual {e.b_residual:.2e} "
                      f"unconverged {100 * e.b_failed:3.0f}%")
        bar.write(f"epoch {e.epoch:3d}/{epochs}  loss {e.loss:.4f}{stats}  "
                  f"test {100 * e.test_accuracy:.1f}%", file=sys.stdout)

    # optax mixes Python floats with int32 counters; standard promotion whatever the
    # caller's JAX configuration.
    with jax.numpy_dtype_promotion("standard"):
        model, history = _training.train(
            model, data, _training.optimizer(steps, peak_lr=1e-2), epochs=epochs,
            batch=batch, seed=args.seed, on_step=bar.update, on_epoch=report)
    bar.close()
    final = history[-1]
    correct = round(final.test_accuracy * data.y_test.size)
    step_ms = 1000 * final.wall_s / steps
    print(f"{model_name} length {length}: test accuracy {100 * final.test_accuracy:.1f}% "
          f"({correct}/{data.y_test.size} nodes) in {time.perf_counter() - started:.1f} s "
          f"wall, {time.process_time() - started_cpu:.1f} s CPU, {step_ms:.0f} ms per "
          "training step (compile included)")
    return final.test_accuracy


def plot_accuracy(results: dict[tuple[str, int], float], models: tuple[str, ...],
                  lengths: tuple[int, ...], path: str) -> None:
    """Test accuracy against chain length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Distinct markers and dashes: the DEQ's and the unroll's lines often coincide.
    styles = {"deq": ("o", "-"), "gcn": ("s", "-"), "unrolled": ("^", "--")}
    for model in models:
        marker, line = styles[model]
        ax.plot(lengths, [100 * results[model, n] for n in lengths], marker=marker,
                linestyle=line, label=model)
    ax.axhline(100 / CLASSES, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("chain length (nodes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("chains: the class is seen only at the head node")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
