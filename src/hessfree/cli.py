"""Command-line interface: ``hessfree demo``."""
from __future__ import annotations

import argparse
import logging
import sys

from hessfree import __version__
from hessfree.errors import HessfreeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hessfree", description="Hessian-free training-data attribution.")
    parser.add_argument("--version", action="version", version=f"hessfree {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="find flipped labels in scikit-learn digits by self-influence")
    demo.add_argument("--out", default="results/demo", help="output folder (default: results/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the label flips, init and batch order")
    demo.add_argument("--noise", type=float, default=0.10, help="fraction of training labels flipped")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the demo's earlier results in --out (never files the demo did not write)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    if args.command == "demo":
        from hessfree.workflows.demo import DemoConfig, format_table, run_demo

        try:
            result = run_demo(args.out, DemoConfig(noise=args.noise, seed=args.seed),
                              progress=not args.no_progress and sys.stderr.isatty(), overwrite=args.overwrite)
        except HessfreeError as exc:
            print(f"hessfree demo: error: {exc}", file=sys.stderr)
            return 2
        print(format_table(result))
        print(f"\nwritten: {args.out}/demo.json, {args.out}/self_influence.npz, {args.out}/run/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
