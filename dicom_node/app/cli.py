"""The ``cytonode`` command.

Sub-commands are registered by ``add_*`` functions of the modules that own
them; this module only assembles the parser and maps errors to exit codes
(0 success, 2 bad usage or input, 1 anything else).
"""

from __future__ import annotations

import argparse
import logging
import sys

from dicom_node.app.commands import NODE_COMMANDS, add_node_commands


class UsageError(Exception):
    """Bad usage or input: exit status 2 with a one-line reason."""


def build_parser(*, node_only: bool = False) -> argparse.ArgumentParser:
    """The full parser; with ``node_only`` just serve/worker/status, which start
    without importing torch (the node process never loads a model itself)."""
    parser = argparse.ArgumentParser(prog="cytonode", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_node_commands(sub)
    if node_only:
        return parser
    # Sub-commands of other modules: register each with one import and one call here.
    from analysis.commands import add_classify, add_evaluate, add_train

    add_train(sub)
    add_classify(sub)
    add_evaluate(sub)
    from analysis.site_commands import add_calibrate_site

    add_calibrate_site(sub)
    from analysis.slide_commands import add_detect
    from dicom_node.slide_commands import add_make_slide

    add_detect(sub)
    add_make_slide(sub)
    from dicom_node.app.analyze import add_analyze

    add_analyze(sub)
    from viewer.auth import add_user_command

    add_user_command(sub)
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
