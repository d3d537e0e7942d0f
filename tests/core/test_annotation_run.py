"""The annotation run on a sample of the suite, in a subprocess, so that CI checks the
jaxtyping annotations of banax and its plugins on every call of the layer, its solvers,
the exact adjoints and the regularizers' closed forms. The default run leaves jaxtyping's
import hook off (with it on, xdist workers once aborted inside XLA's compiler late in full
runs); README names the command of the full annotation run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from annotation_checker import HOOK_OPTION

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = [
    "tests/core/test_annotations_checked.py",  # the proofs that the hook is on
    "tests/deq/test_layer.py",
    "tests/adjoints/test_adjoints_exact.py",
    "tests/reg/test_reg_closed_forms.py",
]


@pytest.mark.slow
def test_a_sample_of_the_suite_passes_with_the_annotations_checked(request):
    if request.config.getoption("jaxtyping_packages", None):
        pytest.skip("this run checks the annotations of every test already")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", HOOK_OPTION,
         *SAMPLE],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # The hook's own tests ran, rather than skipping for want of the hook.
    assert "an annotation run" not in run.stdout
    assert " passed" in run.stdout.splitlines()[-1]
