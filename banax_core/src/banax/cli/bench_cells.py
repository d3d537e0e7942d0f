"""`banax bench --task cells`: training-step time of the `banax.nn` cells against their
plain Equinox equivalents.

Each cell solves `z* = cell(z*, x)` in batch
mode (`batch_axis=0`) inside a `banax.DEQ` and takes one training step: the forward
solve plus the adjoint's backward pass, giving the gradient of `mean(z*²)` with respect
to the cell's arrays. Both versions of a cell hold the same weights, run the same
solver (Anderson; the reversible solver for the reversible adjoint) for a fixed number of
steps (`--cell-steps`, tolerance 0, so they do equal work; the implicit backward runs Picard for
as many steps), and are timed interleaved, one call each per round, after a
warm-up call; the table shows the median and range over `--repeats` rounds.

- `conv`: `banax.nn.ConvCell` (channels last, `banax.nn.conv2d`) against the same block
  written per sample from `eqx.nn.Conv2d` and `eqx.nn.GroupNorm` (channels first) and
  `jax.vmap`ped over the batch, as an Equinox user would write it.
- `mlp`: `banax.nn.MLPCell` against the same cell from `eqx.nn.Linear`.

`run_cells_benchmark(args) -> list[dict]` is the entry point; `args` holds `banax
bench`'s options (`--cells`, `--adjoints`, `--batch`, `--image`, `--channels`,
`--cell-steps`, `--repeats`, `--seed`). Each row has:

- `cell`: `"conv"` or `"mlp"`; `impl`: `"banax.nn"` or `"equinox"`;
- `adjoint`: the adjoint's registry name; `shape`: one sample's state shape;
- `batch`, `steps`: batch size and forward solver steps;
- `ms_median`, `ms_min`, `ms_max`: milliseconds per training step over `repeats` runs;
- `speedup`: the Equinox equivalent's median over this row's (1.0 on Equinox rows);
- `max_abs_grad_diff`: the largest difference between the two versions' gradients
  (same weights, so only rounding).
"""

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import banax
from banax import nn
from banax.benchmark import interleaved_times

ADJOINTS = {
    "implicit": lambda solver: {"name": "implicit", "solver": solver,
                                "b_solver": banax.get_solver("picard", rtol=0.0, atol=0.0,
                                                             max_steps=solver.max_steps,
                                                             batch_axis=0)},
    "jfb": lambda solver: {"name": "jfb", "solver": solver},
    "bptt": lambda solver: {"name": "bptt", "solver": eqx.tree_at(
        lambda s: s.loop_kind, solver, "checkpointed")},
    # The reversible adjoint needs the reversible solver, with the same step budget.
    "reversible": lambda solver: {"name": "reversible", "solver": banax.get_solver(
        "reversible", rtol=0.0, atol=0.0, max_steps=solver.max_steps, batch_axis=0)},
}


class EquinoxConvCell(eqx.Module):
    """`banax.nn.ConvCell`'s block from `eqx.nn` layers, channels first, per sample."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    inject: eqx.nn.Conv2d
    norms: tuple[eqx.nn.GroupNorm, eqx.nn.GroupNorm, eqx.nn.GroupNorm]

    def __init__(self, cell: nn.ConvCell):
        k = cell.conv1.shape[0]
        key = jax.random.key(0)  # every weight is replaced below

        def conv(kernel: jax.Array, bias: jax.Array | None) -> eqx.nn.Conv2d:
            layer = eqx.nn.Conv2d(kernel.shape[2], kernel.shape[3], k, padding=k // 2,
                                  use_bias=bias is not None, key=key, dtype=kernel.dtype)
            layer = eqx.tree_at(lambda c: c.weight, layer, jnp.transpose(kernel, (3, 2, 0, 1)))
            return layer if bias is None else eqx.tree_at(
                lambda c: c.bias, layer, bias[:, None, None])

        def norm(i: int) -> eqx.nn.GroupNorm:
            layer = eqx.nn.GroupNorm(cell.groups, cell.scales[i].shape[0],
                                     dtype=cell.scales[i].dtype)
            return eqx.tree_at(lambda g: (g.weight, g.bias), layer,
                               (cell.scales[i], cell.shifts[i]))

        self.conv1 = conv(cell.conv1, None)
        self.conv2 = conv(cell.conv2, None)
        self.inject = conv(cell.inject, cell.inject_bias)
        self.norms = (norm(0), norm(1), norm(2))

    def one(self, z: jax.Array, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norms[0](self.conv1(z)))
        u = self.norms[1](self.conv2(h) + self.inject(x))
        return self.norms[2](jax.nn.relu(z + u))

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return jax.vmap(self.one)(z, x)


class EquinoxMLPCell(eqx.Module):
    """`banax.nn.MLPCell` from `eqx.nn.Linear` layers, per sample."""

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, cell: nn.MLPCell):
        key = jax.random.key(0)
        hidden = eqx.nn.Linear(cell.W1.shape[1] + cell.U.shape[1], cell.W1.shape[0],
                               key=key, dtype=cell.W1.dtype)
        self.hidden = eqx.tree_at(lambda lin: (lin.weight, lin.bias), hidden,
                                  (jnp.concatenate([cell.W1, cell.U], 1), cell.b1))
        out = eqx.nn.Linear(cell.W2.shape[1], cell.W2.shape[0], key=key, dtype=cell.W2.dtype)
        self.out = eqx.tree_at(lambda lin: (lin.weight, lin.bias), out, (cell.W2, cell.b2))

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        def one(z: jax.Array, x: jax.Array) -> jax.Array:
            return jnp.tanh(self.out(jax.nn.relu(self.hidden(jnp.concatenate([z, x])))))

        return jax.vmap(one)(z, x)


def _problems(args: argparse.Namespace, name: str, key: jax.Array) -> tuple[Any, Any, Any]:
    """`(banax cell, equinox cell, (x_banax, x_equinox))` with the same weights and input."""
    kc, kx = jax.random.split(key)
    if name == "conv":
        c, s = args.channels, args.image
        cell = nn.ConvCell(c, 1, groups=min(4, c), key=kc)
        x = jax.random.normal(kx, (args.batch, s, s, 1))
        return cell, EquinoxConvCell(cell), (x, jnp.moveaxis(x, -1, 1))
    if name == "mlp":
        features = 8 * args.channels
        cell = nn.MLPCell(features, 64, key=kc)
        x = jax.random.normal(kx, (args.batch, 64))
        return cell, EquinoxMLPCell(cell), (x, x)
    raise ValueError(f"unknown cell {name!r}; choose from conv, mlp")


def _train_step(deq: banax.DEQ) -> Callable[[Any, jax.Array], Any]:
    @eqx.filter_jit
    def step(cell: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        def loss(cell: Any) -> jax.Array:
            z = eqx.tree_at(lambda d: d.cell, deq, cell)(x)
            return jnp.mean(z**2)

        return eqx.filter_value_and_grad(loss)(cell)

    return step


def _conv_state_shape(x: jax.Array, channels: int, last: bool) -> tuple[int, ...]:
    s = x.shape[1:3] if last else x.shape[2:4]
    return (*s, channels) if last else (channels, *s)


def run_cells_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every requested cell and adjoint; return one row per implementation."""
    # Zero tolerances make every solve run its full step count, on purpose.
    warnings.filterwarnings("ignore", message=".*backward solve did not converge")
    rows = []
    key = jax.random.key(args.seed)
    for name in [n.strip() for n in args.cells.split(",") if n.strip()]:
        cell, reference, (x, x_ref) = _problems(args, name, key)
        if name == "conv":
            shapes = (_conv_state_shape(x, args.channels, True),
                      _conv_state_shape(x_ref, args.channels, False))
        else:
            shapes = ((8 * args.channels,),) * 2
        for adjoint in [a.strip() for a in args.adjoints.split(",") if a.strip()]:
            if adjoint not in ADJOINTS:
                raise ValueError(f"unknown adjoint {adjoint!r}; choose from {', '.join(ADJOINTS)}")
            solver = banax.get_solver("anderson", rtol=0.0, atol=0.0, max_steps=args.cell_steps,
                                      batch_axis=0)
            calls = []
            for impl, c, xs, shape in (("banax.nn", cell, x, shapes[0]),
                                       ("equinox", reference, x_ref, shapes[1])):
                deq = banax.DEQ(c, adjoint=ADJOINTS[adjoint](solver), state_shape=shape)
                calls.append((impl, _train_step(deq), (c, xs)))
            # Compiled and warmed up by the untimed first call of each.
            ms = 1e3 * interleaved_times([(step, a) for _, step, a in calls], args.repeats)
            times = {impl: ms[:, i] for i, (impl, _, _) in enumerate(calls)}
            grads = [step(*a)[1] for _, step, a in calls]
            diff = _grad_difference(name, grads[0], grads[1])
            reference_median = float(np.median(times["equinox"]))
            for impl, _, _ in calls:
                t = times[impl]
                rows.append({
                    "cell": name, "impl": impl, "adjoint": adjoint, "shape": shapes[0],
                    "batch": args.batch, "steps": args.cell_steps,
                    "ms_median": float(np.median(t)), "ms_min": float(t.min()),
                    "ms_max": float(t.max()), "speedup": reference_median / float(np.median(t)),
                    "max_abs_grad_diff": diff,
                })
    return rows


def _grad_difference(name: str, ours: Any, theirs: Any) -> float:
    """The largest entrywise difference of the two versions' weight gradients."""
    if name == "conv":
        pairs = [(ours.conv1, jnp.transpose(theirs.conv1.weight, (2, 3, 1, 0))),
                 (ours.conv2, jnp.transpose(theirs.conv2.weight, (2, 3, 1, 0))),
                 (ours.inject, jnp.transpose(theirs.inject.weight, (2, 3, 1, 0)))]
    else:
        pairs = [(ours.W2, theirs.out.weight), (ours.b1, theirs.hidden.bias)]
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'cell':<5} {'impl':<9} {'adjoint':<9} {'ms/step (range)':<24} {'speedup':>7}"
             f" {'max |Δgrad|':>11}"]
    for r in rows:
        span = f"{r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f})"
        lines.append(f"{r['cell']:<5} {r['impl']:<9} {r['adjoint']:<9} {span:<24} "
                     f"{r['speedup']:>7.2f} {r['max_abs_grad_diff']:>11.1e}")
    return "\n".join(lines)
