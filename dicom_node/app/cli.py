"""The ``cytonode`` command.

Every sub-command is registered in :mod:`dicom_node.app.commands`; this module only assembles
the parser and maps errors to exit codes (0 success, 2 bad usage or input, 1 anything else).
"""

from __future__ import annotations

import argparse
import logging
import sys

from dicom_node.app.commands import NODE_COMMANDS, add_commands, add_node_commands


class UsageError(Exception):
    """Bad usage or input: exit status 2 with a one-line reason."""


def build_parser(*, node_only: bool = False) -> argparse.ArgumentParser:
    """The full parser; with ``node_only`` just serve/worker/demo/status, which start
    without importing torch (the node process never loads a model itself)."""
    parser = argparse.ArgumentParser(prog="cytonode", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_node_commands(sub)
    if not node_only:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("-")]
    parser = build_parser(node_only=bool(words) and words[0] in NODE_COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (UsageError, ValueError, FileNotFoundError) as exc:  # SettingsError is a ValueError
        print(f"cytonode {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
