"""The `banax` command line: `banax plugins`, `banax demo`, `banax bench`.

The command line lives apart from the library: nothing in `banax` imports this package.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

# One module per command, each exposing `add_arguments(parser)` and `run(args) -> int`.
_COMMANDS = {
    "plugins": (
        "banax.cli.plugins",
        "list registered solvers, adjoints and regularizers, and broken plugins",
    ),
    "demo": ("banax.cli.demo", "train a small DEQ classifier on real data"),
    "bench": ("banax.cli.bench", "run the standard benchmark and print a table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banax", description="Deep equilibrium models in JAX/Equinox."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
