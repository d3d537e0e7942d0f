"""The standard banax benchmark, as a script: `python benchmarks/bench.py --help`.

The same as `banax bench`: the problem, the columns and how they are timed are
described in `banax.cli.bench` (the command) and `banax.benchmark` (the harness it
measures with), and measured tables are in docs/benchmarks.md and docs/choosing.md.
"""

import argparse
import sys

from banax.cli import bench


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(parser)
    return bench.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
