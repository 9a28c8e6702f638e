"""``docs/configuration.md``: every serve flag in one table, generated from the settings.

    python -m service.tools.configuration_table            # rewrite docs/configuration.md
    python -m service.tools.configuration_table --check    # exit 1 if the file is stale

A test runs the check, so the table and :class:`service.core.settings.Settings` cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from service.core.settings import Settings, env_name

__all__ = ["DOC", "render"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_HEAD = """# Configuration

Every flag of `convserve serve`, generated from `service/core/settings.py` by
`python -m service.tools.configuration_table` (a test fails when this page and the settings
differ). Each flag is also an environment variable: a flag on the command line wins over the
variable, which wins over the default. A boolean takes the bare form (`--reflection`), Triton's
form (`--reflection=true`, `--reflection=false`) and `--no-reflection`; its variable takes
`true` or `false`. A repeatable flag replaces its variable's list on its first use.

| flag | environment variable | default | meaning |
|---|---|---|---|
"""


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "none" if not value else "`" + " ".join(map(str, value)) + "`"
    if value == "":
        return "empty"
    if isinstance(value, Path) and value.is_absolute():
        return "the bundled repository"
    return f"`{value}`"


def _flag(name: str, kind: object, metadata: object) -> str:
    flag = "--" + name.replace("_", "-")
    if kind in (bool, "bool"):
        return f"`{flag}`, `{flag}=true\\|false`, `--no-{flag[2:]}`"
    if "separator" in metadata:  # type: ignore[operator]
        return f"`{flag} VALUE` (repeatable)"
    return f"`{flag}`"


def render() -> str:
    """The page's text."""
    rows = []
    for spec in fields(Settings):
        meaning = spec.metadata["help"].replace("|", "\\|")
        choices = spec.metadata.get("choices")
        if choices:
            meaning += f" (one of: {', '.join(choices)})"
        rows.append(
            f"| {_flag(spec.name, spec.type, spec.metadata)} | `{env_name(spec.name)}` "
            f"| {_default(spec.default)} | {meaning} |"
        )
    return _HEAD + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` say whether it is current."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.configuration_table")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(
                f"{DOC} is stale: run python -m service.tools.configuration_table", file=sys.stderr
            )
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
