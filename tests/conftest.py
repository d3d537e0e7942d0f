import os

import hypothesis

# JAX compiles on first call, which would trip hypothesis's per-example deadline.
hypothesis.settings.register_profile("banax", deadline=None, max_examples=25)
hypothesis.settings.load_profile("banax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# float64 is the reference precision of the suite; float32/16/bf16 are tested by
# passing explicit dtypes.
jax.config.update("jax_enable_x64", True)
# The strict modes Equinox, Optimistix and Lineax test under: every dtype promotion and
# every rank broadcast in banax must be explicit.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
