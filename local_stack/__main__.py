"""`python -m local_stack up|down`: the whole system on loopback (`make local` runs `up`).

python -m local_stack up [--dir DIR] [--keep-data]   start, print what runs where, wait for Ctrl-C
python -m local_stack down [--dir DIR]                stop what `up` started (from another shell)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from local_stack.environment import DEFAULT_RUN_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local_stack",
        description="moto's Secrets Manager, MLflow in strict mTLS, the API with our API-key store "
        "(PostgreSQL or sqlite), Redis and a worker, on 127.0.0.1 with free ports.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start everything; Ctrl-C stops everything it started")
    down = commands.add_parser("down", help="stop the stack recorded in the run directory")
    for sub in (up, down):
        sub.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_RUN_DIR,
            help="run directory: state file, logs, certificates, MLflow's data, the key store "
            "(default: .local/ in the repository)",
        )
    up.add_argument(
        "--keep-data",
        action="store_true",
        help="keep MLflow's database and artifacts, and the key store with its secret, after a stop, "
        "and use them on the next start",
    )
    args = parser.parse_args(argv)

    from local_stack import up as stack  # imports the runtime: after argparse, so --help is instant

    if args.command == "up":
        return stack.up(args.dir, keep_data=args.keep_data)
    return stack.down(args.dir)


if __name__ == "__main__":
    sys.exit(main())
