"""`TransformerCell`: the DEQ-Transformer cell (Bai, Kolter & Koltun, 2019)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import AbstractCell
from ._conv_cell import check_int


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
    # eqx.nn.Linear's initialisation: uniform in ±1/√fan_in.
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _alibi_slopes(heads: int) -> list[float]:
    # ALiBi's geometric slopes 2^(−8h/heads), h = 1..heads: each head starts with its
    # own attention span, the steepest looking only a few characters back.
    return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]


class TransformerCell(AbstractCell):
    """The DEQ-Transformer cell: `z' = cell(z, x)` on sequences of feature vectors.

    With `x` the embedded tokens (`(length, dim)`) and `m` an optional memory of earlier
    fixed points (the previous segment's `z*`, `(memory_length, dim)`):

        h  = LN₁(z),  hₘ = LN₁(sg(m))
        qₕ = h Wᵠₕ + x Uᵠₕ + bᵠₕ      (likewise kₕ, vₕ over [hₘ; h], with x's term
                                       on the sequence's rows only)
        aₕ = softmax(qₕ kₕᵀ / √e + Pₕ + causal mask) vₕ
        y  = z + Σₕ aₕ Wᵒₕ + bᵒ
        z' = LN₃(y + W₂ relu(W₁ LN₂(y) + b₁) + b₂)

    `e = dim / heads`; `sg` is `jax.lax.stop_gradient`, so the memory is attended
    without carrying gradient back into it; `Pₕ[i, j] = pₕ[i − j]` is a learned
    relative-position bias per head, initialised as ALiBi's linear penalty
    `−slopeₕ · (i − j)`; the causal mask lets position `i` see itself, the earlier
    positions and the whole memory. Both blocks are residual with pre-layer-norm, and
    the last layer norm keeps the state on a bounded set, which helps the solve.

    **Parameters for tensor parallelism.** The query, key, value and output
    projections hold an explicit heads axis: `qkv` and `inject` are
    `(3, heads, dim, e)`, `qkv_bias` is `(3, heads, e)`, `out` is `(heads, e, dim)` and
    `position_bias` is `(heads, max_length)`; heads never mix before the sum over `h`,
    so splitting these arrays along their heads axis splits the attention by heads.

    **Layout.** `z` and `x` are `(length, dim)` for one sequence or `(N, length, dim)`
    for a batch (batch first: the DEQ's batch mode, `batch_axis=0`); sequences never
    mix. Pass a memory as `x=(embedded, memory)`, batched like `embedded`.

    **Dropout.** With `dropout > 0` the cell takes `key=` (the DEQ passes its own
    `key` on) and drops the same units of both residual branches at every solver
    iteration, since the key is the same (variational dropout, as DEQs need: a fresh
    mask per iteration would move the fixed point). `eqx.nn.inference_mode` turns it
    off.

    **Arguments:**

    - `dim`: features per position (the state's and the input's width).
    - `heads`: attention heads; must divide `dim`.
    - `hidden`: width of the feed-forward block.
    - `max_length`: the longest sequence plus memory the cell attends over (the
        position bias has one entry per distance `0 .. max_length − 1`).
    - `dropout`: the dropout rate, in `[0, 1)` (default 0).
    - `key`: PRNG key for the initial weights (`eqx.nn.Linear`'s uniform
        initialisation; layer norms start at scale 1, shift 0).
    - `dtype`: the parameters' dtype (default: JAX's default float).
    """

    qkv: Float[Array, "3 heads dim e"]
    inject: Float[Array, "3 heads dim e"]
    qkv_bias: Float[Array, "3 heads e"]
    out: Float[Array, "heads e dim"]
    out_bias: Float[Array, " dim"]
    position_bias: Float[Array, "heads max_length"]
    ff_in: Float[Array, "dim hidden"]
    ff_in_bias: Float[Array, " hidden"]
    ff_out: Float[Array, "hidden dim"]
    ff_out_bias: Float[Array, " dim"]
    norms: tuple[eqx.nn.LayerNorm, ...]
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        max_length: int,
        *,
        dropout: float = 0.0,
        key: PRNGKeyArray,
        dtype=None,
    ):
        dim = check_int("TransformerCell", "dim", dim)
        heads = check_int("TransformerCell", "heads", heads)
        hidden = check_int("TransformerCell", "hidden", hidden)
        max_length = check_int("TransformerCell", "max_length", max_length)
        if dim % heads:
            raise ValueError(
                f"TransformerCell: heads must divide dim (each head gets dim / heads "
                f"features), got dim={dim} and heads={heads}; choose e.g. heads="
                f"{math.gcd(dim, heads)}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(
                f"TransformerCell: dropout must be a rate in [0, 1), got {dropout!r}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        e = dim // heads
        keys = jax.random.split(key, 7)
        self.qkv = _uniform(keys[0], (3, heads, dim, e), dim, dtype)
        self.inject = _uniform(keys[1], (3, heads, dim, e), dim, dtype)
        self.qkv_bias = _uniform(keys[2], (3, heads, e), dim, dtype)
        self.out = _uniform(keys[3], (heads, e, dim), dim, dtype)
        self.out_bias = jnp.zeros((dim,), dtype)
        slopes = jnp.asarray(_alibi_slopes(heads), dtype)
        self.position_bias = -slopes[:, None] * jnp.arange(max_length, dtype=dtype)[None, :]
        self.ff_in = _uniform(keys[4], (dim, hidden), dim, dtype)
        self.ff_in_bias = _uniform(keys[5], (hidden,), dim, dtype)
        self.ff_out = _uniform(keys[6], (hidden, dim), hidden, dtype)
        self.ff_out_bias = jnp.zeros((dim,), dtype)
        self.norms = tuple(eqx.nn.LayerNorm(dim, dtype=dtype) for _ in range(3))
        self.dropout = eqx.nn.Dropout(float(dropout))

    @property
    def max_length(self) -> int:
        return self.position_bias.shape[1]

    def __call__(
        self,
        z: Float[Array, "*batch length dim"],
        x: Float[Array, "*batch length dim"] | tuple[Array, Array],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch length dim"]:
        embedded, memory = self._split_input(x)
        dim = self.out.shape[2]
        if z.ndim not in (2, 3) or z.shape[-1] != dim or embedded.shape != z.shape:
            raise ValueError(
                f"TransformerCell: z and the embedded input x must both be (length, "
                f"{dim}) or (N, length, {dim}); got z of shape {z.shape} and x of shape "
                f"{embedded.shape}."
            )
        if memory is not None and (memory.ndim != z.ndim or memory.shape[-1] != dim
                                   or memory.shape[:-2] != z.shape[:-2]):
            raise ValueError(
                f"TransformerCell: the memory must be (memory_length, {dim}) per "
                f"sequence, batched like z, as wide as the cell's dim={dim}; got memory "
                f"of shape {memory.shape} for z of shape {z.shape}. Pass the previous "
                "segment's fixed point z* of this cell."
            )
        span = z.shape[-2] + (0 if memory is None else memory.shape[-2])
        if span > self.max_length:
            raise ValueError(
                f"TransformerCell: the sequence (length {z.shape[-2]}) plus the memory "
                f"attends over {span} positions, more than max_length={self.max_length} "
                f"the cell was built for; build it with max_length >= {span} or cut the "
                "sequence."
            )
        if key is None and self.dropout.p > 0 and not self.dropout.inference:
            raise TypeError(
                f"TransformerCell: dropout={self.dropout.p} needs key= (a DEQ passes "
                "its own: deq(x, key=key)); evaluate without dropout under "
                "eqx.nn.inference_mode, or build the cell with dropout=0."
            )
        embedded = embedded.astype(z.dtype)
        memory = None if memory is None else jax.lax.stop_gradient(memory.astype(z.dtype))
        if z.ndim == 2:
            return self._sequence(z, embedded, memory, key)
        keys = None if key is None else jax.random.split(key, z.shape[0])
        return jax.vmap(self._sequence)(z, embedded, memory, keys)

    @staticmethod
    def _split_input(x: Array | tuple[Array, Array]) -> tuple[Array, Array | None]:
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(
                    "TransformerCell: x must be the embedded tokens or a pair "
                    f"(embedded, memory), got a sequence of {len(x)} items."
                )
            return jnp.asarray(x[0]), jnp.asarray(x[1])
        return jnp.asarray(x), None

    def _sequence(self, z: Array, x: Array, memory: Array | None,
                  key: PRNGKeyArray | None) -> Array:
        """One sequence: `z`, `x` `(length, dim)`, `memory` `(memory_length, dim)`."""
        length, e = z.shape[0], self.qkv.shape[3]
        ln1, ln2, ln3 = (jax.vmap(norm) for norm in self.norms)
        h = ln1(z)
        # q, k, v of the sequence: (3, heads, length, e), the injection added to each.
        qkv = (jnp.einsum("ld,thde->thle", h, self.qkv)
               + jnp.einsum("ld,thde->thle", x, self.inject) + self.qkv_bias[:, :, None, :])
        q, k, v = qkv[0], qkv[1], qkv[2]
        past = 0
        if memory is not None:
            past = memory.shape[0]
            kv = (jnp.einsum("md,thde->thme", ln1(memory), self.qkv[1:])
                  + self.qkv_bias[1:, :, None, :])
            k = jnp.concatenate([kv[0], k], axis=1)
            v = jnp.concatenate([kv[1], v], axis=1)
        # Query i sits at position past + i of the attended span [memory; sequence].
        distance = (past + jnp.arange(length))[:, None] - jnp.arange(past + length)[None, :]
        bias = self.position_bias[:, jnp.clip(distance, 0, self.max_length - 1)]
        scores = jnp.einsum("hie,hje->hij", q, k) / math.sqrt(e) + bias
        scores = jnp.where(distance[None] >= 0, scores, -jnp.inf)
        attended = jnp.einsum("hij,hje->hie", jax.nn.softmax(scores, axis=-1), v)
        y = jnp.einsum("hle,hed->ld", attended, self.out) + self.out_bias[None, :]
        k_attn, k_ff = (None, None) if key is None else jax.random.split(key)
        y = z + self.dropout(y, key=k_attn)
        f = jax.nn.relu(ln2(y) @ self.ff_in + self.ff_in_bias[None, :])
        f = f @ self.ff_out + self.ff_out_bias[None, :]
        return ln3(y + self.dropout(f, key=k_ff))

    def zero_state(self, x: Array | tuple[Array, Array]) -> Float[Array, "*batch length dim"]:
        """Zeros shaped like the embedded tokens (`x`, or `x[0]` with a memory)."""
        embedded, _ = self._split_input(x)
        return jnp.zeros(embedded.shape, self.out.dtype)
