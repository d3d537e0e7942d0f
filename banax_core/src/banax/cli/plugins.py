"""`banax plugins`: what is registered, from which distribution, and what failed to load."""

import argparse
import warnings

from .._registry import (
    DISABLE_AUTOLOAD_ENV,
    KINDS,
    BanaxPluginWarning,
    autoload_enabled,
    plugin_failures,
    registrations,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`banax plugins` takes no options."""
    del parser


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # Failures are listed below; a warning per failure would only repeat them.
        warnings.simplefilter("ignore", BanaxPluginWarning)
        regs = registrations()
        failures = plugin_failures()
    for kind in KINDS:
        rows = [r for r in regs if r.kind == kind]
        print(f"{kind}s:")
        if not rows:
            print("  (none)")
        width = max((len(r.name) for r in rows), default=0)
        for r in rows:
            target = f"{getattr(r.obj, '__module__', '?')}.{getattr(r.obj, '__qualname__', r.obj)}"
            source = f"{r.distribution} {r.version}".strip()
            print(f"  {r.name:<{width}}  {target}  [{source}]")
    if failures:
        print("failed plugins:")
        for f in failures:
            print(f"  {f.plugin} [{f.distribution} {f.version}]: {f.error}")
    if not autoload_enabled():
        print(f"(third-party plugin autoloading is disabled by {DISABLE_AUTOLOAD_ENV})")
    return 0
