"""Run every ```python block of one Markdown page, in order, in this interpreter.

`python run_page.py PAGE` is what `test_docs.py` runs in a fresh subprocess per page, so
that a page's blocks share one namespace (a later block uses what an earlier one
defined) and nothing leaks between pages. Each block is compiled under the page's file
name with its lines kept where they are on the page, so a traceback points at the line
of the Markdown file. On the first failure it prints the page, the block's first line
and the traceback to stderr, and exits with status 1.

A warning that banax itself issues (a tolerance the dtype cannot reach, a backward
solve that did not converge, ...) fails the page too: an example that warns teaches a
configuration that does not work. A block that shows a warning on purpose catches it
(`warnings.catch_warnings`).
"""

import re
import sys
import textwrap
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
