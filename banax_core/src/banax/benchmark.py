"""The benchmark harness behind `banax bench`, for scripts that measure the same way.

**The problem.** One DEQ layer on a batch,

    f(z) = tanh(z Wᵀ + x Uᵀ + b),   z of shape (batch, features), float32,

with `W` symmetric, eigenvalues evenly spread over [0, 0.98] (so `f` contracts slowly),
`U` Gaussian with variance `1/features`, `b = 0` and inputs `x ~ 0.2·N(0, 1)`
(`problem`). The input injection `x Uᵀ + b` is computed once per solve, outside `f`
(`f_spec`), as in a DEQ layer. Solvers run in batch mode until each sample's residual
`‖f(z) − z‖` is at most the tolerance (`solver_options`). The training loss is
`½ ‖z* − target‖²` with `target = roll(x, 1)` (`target`, `train_step`), and
`reference_gradient` is its exact gradient, computed densely in float64.

**Timing.** The unit of time is `t_f`, one evaluation of `f` on the whole batch in a
compiled loop that does nothing else (`f_loop`). Functions are compiled ahead of time
(`compile_timed`, which also returns the compile time) and run once before the clock
starts; calls that are compared are interleaved, one call each per round
(`interleaved_times`), so that load from elsewhere on the machine falls on all of them
alike and their ratios stay meaningful. `measure_solver` and `measure_adjoint` produce
the rows of `banax bench`'s two tables; `solver_table`, `adjoint_table` and
`markdown_table` format them, `targets` checks the solver rows against the targets
below, and `describe_machine` says where the numbers were taken.

**Solver items.** `parse_solver_item` reads `NAME[:KEY=VALUE...]`, the syntax of
`banax bench --solvers` (`anderson:depth=10:damp=1.0`).

Example, on a tiny instance:

    params, x = problem(4, 8, seed=0)
    loop, _ = compile_timed(f_loop, params, x, jnp.asarray(1))
    times = interleaved_times([(loop, (params, x, jnp.asarray(10)))], repeats=3)
"""

import ast
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from banax import Adjoint, Solver, get_adjoint, trace_count, trace_history
from banax.extend import FlatSolution, Problem, solve

__all__ = [
    "ADJOINTS", "DEFAULT_ADJOINTS", "DEFAULT_SOLVERS", "FORWARD_TARGET", "LEARNING_RATE",
    "OVERHEAD_TARGETS", "STEPS_RATIO_TARGET", "TRAIN_TARGET", "WIDE_FACTOR", "Params",
    "SolveOnly", "adjoint_table", "build_adjoint", "cell", "compile_timed",
    "describe_machine", "f_loop", "f_spec", "gradient_error", "interleaved_times",
    "markdown_table", "measure_adjoint", "measure_solver", "parse_solver_item", "problem",
    "reference_gradient", "residual_curve", "solver_options", "solver_table", "target",
    "targets", "temp_memory_mb", "train_step",
]

# The benchmark's parameters, `{"W", "U", "b"}`.
Params = dict[str, jax.Array]

DEFAULT_SOLVERS = "picard,relaxed,reversible,broyden,anderson"
# Training-step learning rate: the update is part of the timed step, its size is not.
LEARNING_RATE = 1e-4
# The performance targets, for the solvers' default options: forward time over the time
# of as many evaluations of `f` (overhead), per solver; the fastest converged solver's
# forward solve and training step in units of `t_f`; Anderson's steps over Picard's.
OVERHEAD_TARGETS = {"picard": 1.10, "anderson": 1.30, "broyden": 1.40}
FORWARD_TARGET = 30.0
TRAIN_TARGET = 60.0
STEPS_RATIO_TARGET = 0.5
# The adjoint table reports each step's memory at `max_steps` and at this many times it.
WIDE_FACTOR = 4

# The adjoint configurations that `banax bench --adjoints` compares: label -> (registry
# name, options). Solver options are registry specs completed in `build_adjoint` with
# the shared options (tolerance, `max_steps`, batch mode); a spec without a "name" is
# the forward solver. "bicgstab" stands for a lineax BiCGStab backward solve.
ADJOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "implicit": ("implicit", {"solver": {}, "b_solver": {}}),
    "implicit+picard": ("implicit", {"solver": {}, "b_solver": {"name": "picard"}}),
    "implicit+bicgstab": ("implicit", {"solver": {}, "b_solver": "bicgstab"}),
    "jfb": ("jfb", {"solver": {}}),
    "gdeq": ("gdeq", {"solver": {"name": "broyden"}}),
    "unroll_phantom": (
        "unroll_phantom", {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5}}
    ),
    "neumann_phantom": (
        "neumann_phantom", {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5}}
    ),
    "bptt": ("bptt", {"solver": {"loop_kind": "checkpointed"}}),
    "reversible": ("reversible", {"solver": {"name": "reversible"}}),
}
DEFAULT_ADJOINTS = ",".join(ADJOINTS)


# --- the problem --------------------------------------------------------------------


def problem(batch: int, features: int, seed: int) -> tuple[Params, jax.Array]:
    """Parameters `{W, U, b}` and inputs `x` of the benchmark problem, in float32."""
    k_q, k_u, k_x = jax.random.split(jax.random.key(seed), 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (features, features), jnp.float32))
    w = (q * jnp.linspace(0.0, 0.98, features, dtype=jnp.float32)[None, :]) @ q.T
    params = {
        "W": (w + w.T) / 2,  # exactly symmetric despite rounding
        "U": jax.random.normal(k_u, (features, features), jnp.float32) / features**0.5,
        "b": jnp.zeros(features, jnp.float32),
    }
    x = 0.2 * jax.random.normal(k_x, (batch, features), jnp.float32)
    return params, x


def cell(z: jax.Array, w: jax.Array, injection: jax.Array) -> jax.Array:
    """`f(z) = tanh(z Wᵀ + injection)`, the injection `x Uᵀ + b` computed beforehand."""
    return jnp.tanh(z @ w.T + injection)


def f_spec(params: Params, x: jax.Array) -> tuple[Callable[..., jax.Array], tuple]:
    """The problem's `(f, args)` for a solver or adjoint, injection computed once."""
    return cell, (params["W"], x @ params["U"].T + params["b"][None])


def target(x: jax.Array) -> jax.Array:
    """What the training loss `½ ‖z* − target‖²` pulls the equilibrium towards."""
    return jnp.roll(x, 1, axis=0)


def solver_options(tol: float, max_steps: int) -> dict[str, Any]:
    """The options every benchmarked solver gets: per-sample `‖f(z) − z‖ ≤ tol`."""
    return dict(atol=tol, rtol=0.0, max_steps=max_steps, batch_axis=0)


class SolveOnly(Adjoint):
    """The bare forward solve as an adjoint, so that timing it needs no adjoint plugin."""

    solver: Solver

    def solve(self, problem: Problem) -> FlatSolution:
        return solve(self.solver, problem)


def f_loop(params: Params, x: jax.Array, n: jax.Array) -> jax.Array:
    """`n` evaluations of `f` in one compiled loop: the baseline of overhead and `t_f`."""
    f, (w, injection) = f_spec(params, x)
    return jax.lax.fori_loop(0, n, lambda _, z: f(z, w, injection), jnp.zeros_like(x))


def train_step(adjoint: Adjoint, x: jax.Array) -> Callable[[Params], Any]:
    """One SGD step on `½ ‖z* − target‖²`; returns `(loss, grads, new params)`."""
    goal = target(x)

    def loss(params: Params) -> jax.Array:
        sol = adjoint(f_spec(params, x), jnp.zeros_like(x))
        return 0.5 * jnp.sum((sol.value - goal) ** 2)

    def step(params: Params) -> tuple[jax.Array, Params, Params]:
        value, grads = jax.value_and_grad(loss)(params)
        return value, grads, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

    return step


def reference_gradient(params: Params, x: jax.Array) -> dict[str, np.ndarray]:
    """The exact gradient of the training loss, densely in float64 with NumPy.

    Per sample `b`, with `J_b = diag(1 − f(z*)²) W`: Newton's method on `z = f(z)` from
    zero, `λ_b = (I − J_bᵀ)⁻¹ (z*_b − target_b)`, and with the pre-activation cotangent
    `μ = λ ⊙ (1 − f(z*)²)`: `W̄ = μᵀ z*`, `Ū = μᵀ x`, `b̄ = Σ_b μ_b`.
    """
    w, u, b = (np.asarray(params[k], np.float64) for k in ("W", "U", "b"))
    xs = np.asarray(x, np.float64)
    injection = xs @ u.T + b
    eye = np.eye(w.shape[0])
    z = np.zeros_like(xs)
    for _ in range(50):
        fz = np.tanh(z @ w.T + injection)
        if np.max(np.abs(fz - z)) < 1e-13:
            break
        jac = (1 - fz**2)[:, :, None] * w
        z = z + np.linalg.solve(eye - jac, (fz - z)[..., None])[..., 0]
    else:
        raise RuntimeError("reference_gradient: Newton's method did not converge in 50 "
                           "steps on the benchmark problem.")
    g = z - np.asarray(target(x), np.float64)
    jac = (1 - fz**2)[:, :, None] * w
    lam = np.linalg.solve(eye - np.swapaxes(jac, 1, 2), g[..., None])[..., 0]
    mu = lam * (1 - fz**2)
    return {"W": mu.T @ z, "U": mu.T @ xs, "b": mu.sum(0)}


def gradient_error(grads: dict[str, Any], reference: dict[str, np.ndarray]) -> float:
    """`‖grads − reference‖ / ‖reference‖`, over all the arrays of `reference` together."""
    error = np.sqrt(sum(np.sum((np.asarray(grads[k], np.float64) - reference[k]) ** 2)
                        for k in reference))
    scale = np.sqrt(sum(np.sum(reference[k] ** 2) for k in reference))
    return float(error / scale)


# --- solver items -------------------------------------------------------------------


def parse_solver_item(
    option: str, item: str, shared: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The registry name and options of one `NAME[:KEY=VALUE...]` item of `option`.

    A value is a Python literal (`10`, `1.0`, `False`, `None`, `'lax'`) or, failing
    that, a bare word taken as a string (`lax`). Raises `ValueError`, its message naming
    `option`, on a malformed item or on a key of `shared`, the options that define the
    benchmark for every solver.
    """
    name, *pairs = (part.strip() for part in item.split(":"))
    example = "e.g. anderson:depth=10:damp=1.0"
    if not name:
        raise ValueError(f"{option} item {item!r} names no solver; write NAME or "
                         f"NAME:KEY=VALUE, {example}.")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = (p.strip() for p in pair.partition("="))
        if not (equals and key.isidentifier() and text):
            raise ValueError(f"{option} item {item!r}: {pair!r} is not KEY=VALUE; "
                             f"write the options as NAME:KEY=VALUE[:KEY=VALUE...], {example}.")
        if key in shared:
            raise ValueError(f"{option} item {item!r} sets {key}, which the benchmark "
                             f"sets for every solver ({_settings(shared)}); change "
                             "--tol or --max-steps instead.")
        if key in options:
            raise ValueError(f"{option} item {item!r} sets {key} twice.")
        options[key] = _literal(option, item, text)
    return name, options


def _settings(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def _literal(option: str, item: str, text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.isidentifier():
            return text
        raise ValueError(f"{option} item {item!r}: {text!r} is neither a Python literal "
                         "nor a bare word; quote a string, e.g. loop_kind='lax'.") from None
    # Scalars only: a list or tuple could not hold a comma anyway, and rows go to JSON.
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{option} item {item!r}: {text!r} is a "
                         f"{type(value).__name__}; a value is a number, True, False, None "
                         "or a string.")
    return value


# --- compiling and timing -----------------------------------------------------------


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn` compiled ahead of time for `args`, and the seconds tracing and compilation
    took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def interleaved_times(
    calls: Sequence[tuple[Callable[..., Any], tuple]], repeats: int
) -> np.ndarray:
    """Wall times in seconds, shape `(max(repeats, 1), len(calls))`, of `fn(*args)` for
    each `(fn, args)` of `calls`.

    Each call runs once untimed first (compiling it if it is not compiled yet); then
    the calls take turns, one each per round, every call closed by
    `jax.block_until_ready`, so that load from elsewhere on the machine falls on all
    of them alike and ratios stay meaningful.
    """
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = np.empty((max(repeats, 1), len(calls)))
    for r in range(times.shape[0]):
        for i, (fn, args) in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[r, i] = time.perf_counter() - start
    return times


def temp_memory_mb(compiled: Any) -> float:
    """Scratch memory XLA allocates for a compiled computation, in MiB."""
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def describe_machine() -> str:
    """The CPU, the cores available, JAX and its device, and Python, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return (
        f"{cpu}, {cores} cores available; JAX {jax.__version__} on "
        f"{device.platform} ({device.device_kind}); Python {platform.python_version()}"
    )


# --- the solver comparison ----------------------------------------------------------


def measure_solver(
    label: str, solver: Solver, params: Params, x: jax.Array,
    loop: Callable[..., Any], repeats: int, train: bool,
) -> dict[str, Any]:
    """One row of the solver table: steps, `f` evaluations, forward time (ms, in `t_f`
    and as overhead), compile time and, with `train`, the implicit training step.

    `loop` is `f_loop` compiled for `(params, x, n)`; it is timed interleaved with the
    solve (and the training step) for as many evaluations of `f` as the solve makes.
    The training step needs the `implicit` adjoint, from `banax-adjoints`.
    """
    def forward(params: Params, x: jax.Array) -> Any:
        sol = SolveOnly(solver)(f_spec(params, x), jnp.zeros_like(x), trace=trace_count())
        return sol.stats.steps, sol.trace, jnp.max(sol.stats.abs_err)

    compiled, compile_s = compile_timed(forward, params, x)
    steps, evals, worst = jax.device_get(compiled(params, x))
    evals = int(evals)
    calls = [(compiled, (params, x)), (loop, (params, x, jnp.asarray(evals)))]
    if train:
        adjoint = get_adjoint("implicit", solver=solver, b_solver=solver)
        step, _ = compile_timed(train_step(adjoint, x), params)
        calls.append((step, (params,)))
    times = interleaved_times(calls, repeats)
    t_f = times[:, 1] / evals  # per repeat: the unit measured next to the solve
    row = {
        "solver": label,
        "steps": int(np.max(steps)),
        "mean_steps": float(np.mean(steps)),
        "evals": evals,
        "converged": bool(worst <= solver.atol),
        "forward_ms": 1e3 * float(np.median(times[:, 0])),
        "forward_f": float(np.median(times[:, 0] / t_f)),
        "overhead": float(np.median(times[:, 0] / times[:, 1])),
        "compile_s": compile_s,
        "t_f_ms": 1e3 * float(np.median(t_f)),
    }
    if train:
        row["train_ms"] = 1e3 * float(np.median(times[:, 2]))
        row["train_f"] = float(np.median(times[:, 2] / t_f))
    return row


def targets(rows: list[dict[str, Any]], train: bool) -> list[dict[str, Any]]:
    """The targets that the solver rows can be checked against, each
    `{"what", "value", "limit", "ok"}`.

    The targets are about the solvers' default options, so only the rows without
    options count (`row["options"]` empty): `anderson:depth=10` is neither "the
    anderson row" nor a fastest solver.
    """
    plain = [r for r in rows if not r["options"]]
    by_name = {r["name"]: r for r in plain}
    out = []

    def add(what: str, value: float, limit: float) -> None:
        out.append({"what": what, "value": value, "limit": limit, "ok": value <= limit})

    for name, limit in OVERHEAD_TARGETS.items():
        if name in by_name:
            add(f"{name} overhead", by_name[name]["overhead"], limit)
    if "anderson" in by_name and "picard" in by_name:
        add("anderson steps / picard steps", by_name["anderson"]["steps"]
            / by_name["picard"]["steps"], STEPS_RATIO_TARGET)
    converged = [r for r in plain if r["converged"]]
    if converged:
        best = min(converged, key=lambda r: r["forward_f"])
        add(f"fastest forward ({best['solver']}), in t_f", best["forward_f"], FORWARD_TARGET)
        if train:
            best = min(converged, key=lambda r: r["train_f"])
            add(f"fastest training step ({best['solver']}), in t_f", best["train_f"],
                TRAIN_TARGET)
    return out


def residual_curve(solver: Solver, params: Params, x: jax.Array, evals: int) -> np.ndarray:
    """The largest per-sample residual `‖f(z) − z‖` at each of the first `evals`
    evaluations of `f`."""

    def worst(z: jax.Array, fz: jax.Array, aux: Any) -> jax.Array:
        return jnp.max(jnp.linalg.norm(fz - z, axis=-1))

    @jax.jit
    def traced(params: Params, x: jax.Array) -> Any:
        sol = SolveOnly(solver)(
            f_spec(params, x), jnp.zeros_like(x), trace=trace_history(worst, n_evals=evals)
        )
        return sol.trace

    count, history = jax.device_get(traced(params, x))
    return np.asarray(history[: min(int(count), evals)])


# --- the adjoint comparison ---------------------------------------------------------


def build_adjoint(
    label: str, forward: tuple[str, dict[str, Any]], tol: float, max_steps: int
) -> Adjoint:
    """The adjoint `label` of `ADJOINTS`, its solvers built with `solver_options(tol,
    max_steps)`; `forward` is the `(name, options)` of the forward solver of the
    adjoints that accept any (see `parse_solver_item`).

    The lineax BiCGStab backward solve needs lineax, a dependency of banax-adjoints.
    """
    name, spec = ADJOINTS[label]
    options: dict[str, Any] = {}
    for key, value in spec.items():
        if value == "bicgstab":
            import lineax as lx  # a dependency of banax-adjoints, not of the core

            # lineax measures the largest entry over the whole batch, relative to the
            # right-hand side's; a tenth of the per-sample tolerance keeps the gradient
            # error at the level the forward tolerance allows.
            value = lx.BiCGStab(rtol=tol / 10, atol=0.0)
        elif isinstance(value, dict):
            # The forward options belong to the forward solver, not to a named one.
            forward_name, forward_options = forward
            chosen = {} if "name" in value else {"name": forward_name, **forward_options}
            value = {**solver_options(tol, max_steps), **chosen, **value}
        options[key] = value
    return get_adjoint(name, **options)


def measure_adjoint(
    label: str, adjoint: Adjoint, wide: Adjoint, params: Params, x: jax.Array,
    loop: Callable[..., Any], reference: dict[str, np.ndarray], repeats: int,
) -> dict[str, Any]:
    """One row of the adjoint table: training-step time (ms and in `t_f`), XLA's
    temporary memory for the step under `adjoint` and under `wide` (the same adjoint
    with a larger `max_steps`), and the gradient's error against `reference`.

    `loop` is `f_loop` compiled for `(params, x, n)`, timed interleaved with the step.
    """
    step, compile_s = compile_timed(train_step(adjoint, x), params)
    wide_step, _ = compile_timed(train_step(wide, x), params)
    _, grads, _ = jax.device_get(step(params))
    n = 20  # f evaluations in the reference loop that measures t_f next to the step
    times = interleaved_times([(step, (params,)), (loop, (params, x, jnp.asarray(n)))],
                              repeats)
    t_f = times[:, 1] / n
    return {
        "adjoint": label,
        "solver": type(adjoint.solver).__name__,
        "train_ms": 1e3 * float(np.median(times[:, 0])),
        "train_f": float(np.median(times[:, 0] / t_f)),
        "memory_mb": temp_memory_mb(step),
        "memory_wide_mb": temp_memory_mb(wide_step),
        "grad_error": gradient_error(grads, reference),
        "compile_s": compile_s,
    }


# --- tables -------------------------------------------------------------------------


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table: a header row, a rule, one line per row of `cells`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def solver_table(rows: list[dict[str, Any]], train: bool) -> str:
    """The solver comparison of `measure_solver` rows, with the median `t_f` below."""
    header = ["solver", "steps (max / mean)", "f evals", "forward ms", "forward / t_f",
              "overhead", "compile s"]
    if train:
        header[6:6] = ["train ms", "train / t_f"]
    cells = []
    for r in rows:
        steps = f"{r['steps']} / {r['mean_steps']:.1f}"
        if not r["converged"]:
            steps += " (not converged)"
        row = [r["solver"], steps, str(r["evals"]), f"{r['forward_ms']:.1f}",
               f"{r['forward_f']:.1f}", f"{r['overhead']:.2f}", f"{r['compile_s']:.1f}"]
        if train:
            row[6:6] = [f"{r['train_ms']:.1f}", f"{r['train_f']:.1f}"]
        cells.append(row)
    t_f = np.median([r["t_f_ms"] for r in rows])
    return (markdown_table(header, cells) + f"\n\nt_f (one f evaluation on the batch, in a "
            f"compiled loop): {t_f:.3f} ms")


def adjoint_table(rows: list[dict[str, Any]], max_steps: int) -> str:
    """The adjoint comparison of `measure_adjoint` rows, `wide` at `WIDE_FACTOR *
    max_steps`."""
    header = ["adjoint", "forward solver", "train ms", "train / t_f",
              f"memory MiB (max_steps={max_steps})",
              f"memory MiB (max_steps={WIDE_FACTOR * max_steps})",
              "gradient rel. error", "compile s"]
    cells = [[r["adjoint"], r["solver"], f"{r['train_ms']:.1f}", f"{r['train_f']:.1f}",
              f"{r['memory_mb']:.2f}", f"{r['memory_wide_mb']:.2f}",
              f"{r['grad_error']:.1e}", f"{r['compile_s']:.1f}"] for r in rows]
    return (markdown_table(header, cells) + "\n\nmemory: XLA's temporary allocation for the "
            "compiled training step; gradient error: relative to the exact implicit "
            "gradient, computed densely in float64.")
