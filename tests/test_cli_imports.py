"""The ``convserve`` command line stays light: ``--help`` and the client need no ONNX Runtime.

Each command imports what it runs on when it runs, so building the parser (every ``convserve``
call does) imports neither ONNX Runtime, torch, gRPC nor the bench's measuring modules.
"""

from __future__ import annotations

import pytest

from tests.apart import run_apart

SCRIPT = """
import contextlib, io, json, sys

from service.__main__ import build_parser, main

parser = build_parser()
parser.parse_args(["models"])
parser.parse_args(["classify", "image.png", "--dense"])
parser.parse_args(["bench", "--smoke"])
with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
    main(["--help"])
parsed = sorted(sys.modules)
# A client command, run against no server at all: its one error line, and what it imported.
with contextlib.redirect_stderr(io.StringIO()) as error:
    code = main([*sys.argv[1:], "--server", "127.0.0.1:1", "--timeout", "5"]) if sys.argv[1:] else 0
print(json.dumps({"help": shown.getvalue(), "parsed": parsed, "ran": sorted(sys.modules),
                  "code": code, "error": error.getvalue()}))
"""

HEAVY = ("onnxruntime", "torch", "service.engine.runtime", "export.model_entry")
BENCH = (
    "service.tools.bench.command",
    "service.tools.bench.sweep",
    "service.tools.bench.raw",
    "service.tools.bench.comparisons",
)


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_building_the_parser_and_help_import_nothing_heavy() -> None:
    outcome = run_apart(SCRIPT)
    assert "COMMAND" in outcome["help"] and "bench" in outcome["help"]
    assert loaded(outcome["parsed"], (*HEAVY, *BENCH, "grpc", "numpy")) == []


@pytest.mark.parametrize(
    ("command", "error"),
    [(["models"], "UNAVAILABLE"), (["classify", "missing.png"], "cannot read missing.png")],
)
def test_a_client_command_runs_without_onnx_runtime(command: list[str], error: str) -> None:
    outcome = run_apart(SCRIPT, *command)
    assert outcome["code"] == 1
    assert outcome["error"].startswith(f"convserve {command[0]}: error: ")
    assert error in outcome["error"]
    assert "grpc" in outcome["ran"]  # the command itself ran, as far as it could
    assert loaded(outcome["ran"], (*HEAVY, *BENCH)) == []
