"""README's install lines, and fresh virtual environments to run them in.

`uv pip install --no-sources` resolves like pip: a workspace member is found only when
its folder is given, never through the workspace's `tool.uv.sources`. The third-party
dependencies (jax, equinox, ...) come from uv's cache, which `uv run` has filled, so a
machine without network access still runs these tests; online, an uncached package is
fetched as pip would.
"""

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_install_lines() -> list[str]:
    """The `pip install` lines of README.md's Install section, as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines()
            if line.strip().startswith("pip install ")]


def requirements(line: str) -> list[str]:
    """What `pip install ...` installs: its arguments."""
    return shlex.split(line)[2:]


# README's selective install, which test_selective_install.py runs step by step.
SELECTIVE_LINE = "pip install ./banax_core ./banax_solvers"


def fresh_venv(where: Path) -> Path:
    """A new, empty venv on the suite's Python; returns its interpreter."""
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(where)],
                   check=True)
    return where / "bin" / "python"


def pip_install(python: Path, *requirements: str) -> subprocess.CompletedProcess:
    """`pip install *requirements` from the repository root, into `python`'s venv.

    Offline first; only what uv's cache lacks sends it to the index.
    """
    command = ["uv", "pip", "install", "--quiet", "--no-sources", "--python", str(python),
               *requirements]
    run = subprocess.run([*command, "--offline"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0 and "network was disabled" in run.stderr:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return run
