"""Run every ```python block of one Markdown page, in order, in one namespace.

`python run_page.py PAGE` runs one page in this interpreter. `python run_page.py --serve`
is what `test_docs.py` starts, once per pytest worker: it imports what every page
imports (JAX, Equinox, Optax, banax) without starting any JAX backend, then runs each
requested page in a child forked from itself, so that a page's blocks share one
namespace (a later block uses what an earlier one defined), nothing leaks between pages
(each child starts from the same unconfigured JAX), and no page pays the import again.
Each block is compiled under the page's file name with its lines kept where they are on
the page, so a traceback points at the line of the Markdown file. On the first failure
it prints the page, the block's first line and the traceback to stderr, and exits with
status 1.

A warning that banax itself issues (a tolerance the dtype cannot reach, a backward
solve that did not converge, ...) fails the page too: an example that warns teaches a
configuration that does not work. A block that shows a warning on purpose catches it
(`warnings.catch_warnings`).
"""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

# An opening fence may be indented (a block inside a list item); its closing fence
# carries the same indentation.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of `text` as `(line of the first code line, code)`."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = opening["indent"]
        closing = re.compile(rf"^{re.escape(indent)}```\s*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if opening["info"].strip() == "python":
            blocks.append((i + 2, textwrap.dedent("\n".join(lines[i + 1 : j]))))
        i = j + 1
    return blocks


def from_banax(category: type[Warning]) -> bool:
    """Whether a warning is one of banax's own kinds (not JAX's or Python's)."""
    package = category.__module__.split(".")[0]
    return package == "banax" or package.startswith("banax_")


def main(page: str) -> int:
    namespace = {"__name__": "__main__"}
    banax_warnings: list[str] = []
    current = [0]  # the line of the block that is running
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if from_banax(category):
            banax_warnings.append(
                f"the block at line {current[0]}: {category.__name__}: {message}")
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    for line, code in python_blocks(Path(page).read_text(encoding="utf-8")):
        current[0] = line
        # Leading newlines keep the page's line numbers in tracebacks.
        source = "\n" * (line - 1) + code
        try:
            exec(compile(source, page, "exec"), namespace)
        except BaseException as error:
            print(f"{page}: the block at line {line} failed:", file=sys.stderr)
            # From the page's frame on: this runner's own frame says nothing.
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            return 1
    if banax_warnings:
        print(f"{page}: banax warned:\n" + "\n".join(banax_warnings), file=sys.stderr)
        return 1
    return 0


#: What the pages import, loaded once by the server before it forks.
PRELOAD = ("numpy", "jax", "jax.numpy", "equinox", "optax", "banax", "banax.nn")


def run_forked(page: str, cwd: str, timeout: float) -> dict:
    """Run `page` in a forked child working in `cwd`: `{"returncode", "stderr"}`, the
    return code None when the child was killed after `timeout` seconds. Where there is no
    `fork` (Windows), the page runs in a fresh interpreter instead."""
    if not hasattr(os, "fork"):
        try:
            run = subprocess.run([sys.executable, __file__, page], cwd=cwd, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"returncode": None, "stderr": ""}
        return {"returncode": run.returncode, "stderr": run.stderr}
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(cwd)
                quiet = os.open(os.devnull, os.O_RDWR)
                os.dup2(quiet, 0)
                os.dup2(quiet, 1)
                os.dup2(err.fileno(), 2)
                code = main(page)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"returncode": None, "stderr": ""}
            time.sleep(0.02)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(waited[1]),
                "stderr": err.read().decode(errors="replace")}


def serve() -> int:
    """Answer requests on stdin, one JSON line each (`{"page", "cwd", "timeout"}`), with
    `run_forked`'s answer as one JSON line on stdout."""
    for name in PRELOAD:
        importlib.import_module(name)
    from jax._src import xla_bridge

    # A child may still configure JAX (x64, the device count) only if no backend started.
    assert not xla_bridge.backends_are_initialized(), "importing the pages' modules started JAX"
    for line in sys.stdin:
        print(json.dumps(run_forked(**json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1] == "--serve" else main(sys.argv[1]))
