"""`translator-bench`: the benchmarks behind one command.

* ``translator-bench engine ...``: greedy throughput of our engine against PyTorch and CTranslate2
  (bench/engine.py; ``translator-bench engine --help``).
* ``translator-bench load ...``: load test of the service (bench/load.py).
* ``translator-bench phases ...``: where a greedy batch's time goes inside our engine (bench/phases.py).
* ``translator-bench performance``: docs/PERFORMANCE.md, generated from every run in docs/results/.

Subcommands are imported only when chosen: ``engine`` needs torch and CTranslate2, the others do not.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from service.core.cli import run_command

SUBCOMMANDS = {
    "engine": ("bench.engine", "throughput of our engine vs PyTorch and CTranslate2 (same weights)"),
    "load": ("bench.load", "load test of the running service"),
    "phases": ("bench.phases", "time per engine phase (encoder, decoder steps, row selection, host)"),
    "performance": ("bench.performance", "regenerate docs/PERFORMANCE.md from docs/results/"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package itself is missing
        return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    lines = [f"  {name:<8} {help_text}" + ("" if _available(module) else " (not installed)")
             for name, (module, help_text) in SUBCOMMANDS.items()]
    parser = argparse.ArgumentParser(prog="translator-bench", description=__doc__.splitlines()[0],
                                     epilog="subcommands:\n" + "\n".join(lines),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its options (translator-bench COMMAND -h)")
    args = parser.parse_args(argv)
    module_name = SUBCOMMANDS[args.command][0]
    if not _available(module_name):
        parser.exit(2, f"translator-bench: '{args.command}' needs {module_name}, which is not here yet\n")
    module = importlib.import_module(module_name)
    # Each subcommand takes its own argv; its return value is for callers in Python, not an exit code.
    run_command(f"translator-bench {args.command}", lambda: module.main(args.args))


if __name__ == "__main__":
    main()
