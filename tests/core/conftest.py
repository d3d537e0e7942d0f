import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from banax._registry import DISABLE_AUTOLOAD_ENV, REGISTRY


class FakeDistributions:
    """Installs throw-away distributions (a dist-info with entry points plus a module)
    on sys.path, the way pip would, so discovery runs through importlib.metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, module: str, source: str, *, version: str = "1.0",
            entry_name: str | None = None) -> None:
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        (info / "entry_points.txt").write_text(
            f"[banax]\n{entry_name or module} = {module}\n"
        )
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        self.modules.append(module)
        importlib.invalidate_caches()
        REGISTRY.reset()


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    dists = FakeDistributions(tmp_path)
    REGISTRY.reset()
    yield dists
    for module in dists.modules:
        sys.modules.pop(module, None)
    REGISTRY.reset()


@pytest.fixture
def autoload_off(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    REGISTRY.reset()
    yield
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    REGISTRY.reset()
