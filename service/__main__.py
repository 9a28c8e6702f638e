"""``convserve``: the one command line of the project (serve, export, inspect, demo).

Building the parser imports only the commands' argument definitions: each command imports what
it runs on (ONNX Runtime, torch, the bench) when it runs, so ``--help`` and the client commands
stay quick and need neither ONNX Runtime nor torch.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Sequence

from export.cli import add_commands as add_export_commands
from export.errors import ExportError
from service import BUNDLED_REPOSITORY
from service.core import flags
from service.core.settings import SettingError
from service.tools.bench.cli import add_commands as add_bench_commands
from service.tools.client import ClientError
from service.tools.client import add_commands as add_client_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``convserve`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="convserve",
        description="Serve convolutional classifiers (ONNX Runtime, gRPC, dense evaluation).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over gRPC (KServe v2), metrics over HTTP",
        usage="convserve serve [options] (every option: convserve serve --help)",
        description="Every flag also reads an environment variable, shown in brackets.",
    )
    flags.add_arguments(serve)
    serve.set_defaults(handler=_serve)
    add_client_commands(commands)
    add_bench_commands(commands)
    add_export_commands(commands, BUNDLED_REPOSITORY)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from service.app.server import run_server
    from service.app.workers import supervise, worker_role
    from service.core import event_loop
    from service.core.logs import configure_logging

    chosen = flags.from_arguments(args)
    try:
        factory = event_loop.loop_factory(chosen.event_loop)
    except ValueError as exc:  # uvloop asked for where it is not installed
        raise SettingError(str(exc)) from exc
    role = worker_role()
    configure_logging(chosen.log_format, chosen.log_level, None if role is None else role.index)
    if chosen.workers > 1 and role is None:
        return supervise(chosen)
    return event_loop.run(lambda: run_server(chosen, role), factory)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, answering an unknown flag with its command's usage and the closest valid flag.

    argparse reports a subcommand's unknown flag from the top-level parser, whose usage does
    not list the subcommand's flags.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _subparsers(parser).get(getattr(args, "command", ""), parser)
        flags = [o for action in command._actions for o in action.option_strings]
        hints = []
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
            hints.append(f"{word} (did you mean {close[0]}?)" if close else word)
        command.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors end as one line on stderr and a non-zero exit, no traceback.

    Set ``CONVSERVE_DEBUG=1`` to see the traceback of an unexpected failure.
    """
    try:
        parser = build_parser()
    except SettingError as exc:  # an environment variable no setting can take
        print(f"convserve: error: {exc}", file=sys.stderr)
        return 2
    args = _parse(parser, argv)
    try:
        code = args.handler(args)
    except (SettingError, ExportError, ClientError) as exc:
        print(f"convserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("CONVSERVE_DEBUG"):
            traceback.print_exc()
        print(
            f"convserve {args.command}: error: unexpected {type(exc).__name__}: {exc} "
            "(set CONVSERVE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
