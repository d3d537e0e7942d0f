import gc
import os

import hypothesis
import pytest

from xla_flags import with_suite_flags

# JAX compiles on first call, which would trip hypothesis's per-example deadline.
# Derandomized: CI and every rerun draw the same examples, so a red run reproduces.
hypothesis.settings.register_profile("banax", deadline=None, max_examples=25, derandomize=True)
hypothesis.settings.load_profile("banax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Subprocesses (CLI runs, multi-device runs) inherit the flags.
os.environ["XLA_FLAGS"] = with_suite_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

# float64 is the reference precision of the suite; float32/16/bf16 are tested by
# passing explicit dtypes.
jax.config.update("jax_enable_x64", True)
# The strict modes Equinox, Optimistix and Lineax test under: every dtype promotion and
# every rank broadcast in banax must be explicit.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tracing allocates many short-lived objects, and at Python's default threshold (700) the
# cyclic collector runs thousands of times per module, rescanning the imported libraries:
# those are frozen out of its scans and the threshold raised (about 5 % less time).
gc.collect()
gc.freeze()
gc.set_threshold(50_000, 50, 100)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's caches of compiled programs after each test module. An xdist worker runs
    hundreds of modules in one process and would otherwise keep every program XLA compiled
    (its code mapped in memory) to the end; late in full runs workers crashed inside XLA's
    compiler."""
    yield
    jax.clear_caches()


def pytest_configure(config):
    """A plugin that fails to load fails the test that loaded it. The filter names banax's class
    only here, after jaxtyping's import hook (an annotation run's `--jaxtyping-packages`) is
    installed: pytest resolves it, importing banax, when it collects, so banax is imported
    instrumented."""
    config.addinivalue_line("filterwarnings", "error::banax.BanaxPluginWarning")


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, so that under xdist they overlap the many short
    ones instead of trailing after them on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
