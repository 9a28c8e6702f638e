"""Project hygiene that CI must keep true: lint, types, and the README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_ci_runs_the_readme_test_command() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_mandated_top_level() -> None:
    for name in ("service", "proto", "export", "deploy", "tests", "Dockerfile", "pyproject.toml"):
        assert (ROOT / name).exists(), name


def test_generated_stubs_are_current() -> None:
    result = run(sys.executable, "proto/generate.py", "--check")
    assert result.returncode == 0, result.stderr


MAX_MODULE_LINES = 400


def test_no_hand_written_module_is_over_400_lines() -> None:
    written = [
        path
        for folder in ("service", "export", "model_format", "tests", "scripts", "proto", "deploy")
        for path in (ROOT / folder).rglob("*.py")
        if "_generated" not in path.parts
    ]
    assert len(written) > 50
    long = {
        str(p.relative_to(ROOT)): n
        for p in written
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines): {long}"


def test_no_function_takes_more_than_six_parameters() -> None:
    """ruff's PLR0913 enforces it; this pins the rule and its bound in the configuration."""
    text = (ROOT / "pyproject.toml").read_text()
    assert '"PLR0913"' in text and "max-args = 6" in text


def test_every_path_the_architecture_names_exists() -> None:
    """docs/architecture.md's room table stays true: each file or folder it names is there."""
    for doc in ("docs/architecture.md", "README.md"):
        text = (ROOT / doc).read_text()
        named = set(
            re.findall(
                r"`((?:service|export|model_format|tests|scripts|docs|deploy)/[\w/.]*)`", text
            )
        )
        assert len(named) > 5 or doc == "README.md", doc
        missing = sorted(p for p in named if not (ROOT / p).exists())
        assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_configuration_page_lists_every_setting() -> None:
    from service.tools.configuration_table import DOC, render

    page = DOC.read_text()
    assert page == render(), (
        "docs/configuration.md is stale: python -m service.tools.configuration_table"
    )
    assert "`--grpc-use-ssl`, `--grpc-use-ssl=true\\|false`, `--no-grpc-use-ssl`" in page
    assert "`CONVSERVE_DRAIN_GRACE_SECONDS`" in page
