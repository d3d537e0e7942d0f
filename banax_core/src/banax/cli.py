"""The `banax` command line: `banax plugins`, `banax demo`, `banax bench`."""

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from ._registry import KINDS, BanaxPluginWarning, autoload_enabled, DISABLE_AUTOLOAD_ENV

# Subcommands implemented in their own modules, each exposing
# `add_arguments(parser)` and `run(args) -> int`.
_COMMANDS = {
    "demo": ("banax.demo", "train a small DEQ classifier on scikit-learn's digits"),
    "bench": ("banax.bench", "run the standard benchmark and print a table"),
}


def _plugins(args: argparse.Namespace) -> int:
    from ._registry import plugin_failures, registrations

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banax", description="Deep equilibrium models in JAX/Equinox."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser(
        "plugins", help="list registered solvers, adjoints and regularizers, and broken plugins"
    )
    plugins.set_defaults(handler=_plugins)
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
