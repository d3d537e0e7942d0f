import os

import hypothesis

# JAX compiles on first call, which would trip hypothesis's per-example deadline.
hypothesis.settings.register_profile("banax", deadline=None, max_examples=25)
hypothesis.settings.load_profile("banax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
