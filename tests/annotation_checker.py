"""The type checker jaxtyping's import hook applies to banax in the annotation runs
(`HOOK_OPTION`): beartype, reading `float` as `float | int` and `complex` as
`complex | float | int` as the typing specification (and basedpyright) do, so that `damp=1`
meets `damp: float`. beartype's default refuses an int there."""

import contextlib

import jaxtyping
from beartype import BeartypeConf, beartype

check = beartype(conf=BeartypeConf(is_pep484_tower=True))

HOOK_OPTION = (
    "--jaxtyping-packages=banax,banax_solvers,banax_adjoints,banax_reg,annotation_checker.check"
)
"""The pytest option of an annotation run (README): the hook on banax and its first-party
plugins, with `check` as the checker."""


@contextlib.contextmanager
def without_annotation_checks():
    """Turn the checks off (a context manager, or a decorator of a test).

    For the tests of banax's own argument checks: a user without the hook gets their
    messages (which name the argument, the value and the fix), while under the hook a
    wrongly typed argument raises jaxtyping's `TypeCheckError` before they run.
    """
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
