"""The ``precond`` console script. Subcommands: ``bench``."""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: precond bench [options]   (precond bench --help for the options)")
        return 0 if argv else 2
    if argv[0] == "bench":
        if importlib.util.find_spec("precond_bench") is None:
            print("precond bench needs the benchmark package, which the library does not ship: "
                  "pip install ./benchmarks (precond-bench) from a checkout", file=sys.stderr)
            return 2
        from precond_bench.__main__ import main as bench_main
        return bench_main(argv[1:])
    print(f"precond: unknown command {argv[0]!r}; try 'precond bench --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
