"""How settings become command-line flags and environment variables, and back.

Every setting is a flag and a variable: ``--grpc-port`` is also ``CONVSERVE_GRPC_PORT`` (prefix,
upper case, dashes to underscores). A flag on the command line wins over the environment, which
wins over the default. Booleans take ``--flag``, Triton's ``--flag=true|false`` and ``--no-flag``;
a repeatable flag replaces the variable's list on its first use.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from service.core.settings import SettingError, Settings, env_name

__all__ = ["add_arguments", "from_arguments", "parse_bool", "parse_value"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off, any case) as a bool.

    Raises:
        ValueError: any other text.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_value(kind: Any, text: str, separator: str = ",") -> Any:
    """A setting's value from its environment-variable text (``"4,8"`` for a list)."""
    if kind in (bool, "bool"):
        return parse_bool(text)
    if kind in (tuple[str, ...], "tuple[str, ...]"):
        return tuple(v.strip() for v in text.split(separator) if v.strip())
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if kind in (Path, "Path"):
        return Path(text)
    if kind in (tuple[int, ...], "tuple[int, ...]"):
        return tuple(int(v) for v in text.replace(",", " ").split())
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, defaulting to its environment variable, then its default.

    Raises:
        SettingError: an environment variable's text is not a value of its setting.
    """
    for spec in fields(Settings):
        env = env_name(spec.name)
        default = spec.default
        if env in os.environ:
            try:
                default = parse_value(
                    spec.type, os.environ[env], spec.metadata.get("separator", ",")
                )
            except ValueError:
                raise SettingError(
                    f"invalid setting {spec.name} from {env}={os.environ[env]!r}"
                ) from None
        options: dict[str, Any] = {
            "default": default,
            "dest": spec.name,
            "help": f"{spec.metadata['help']} [{env}; default: {_shown(spec.default)}]",
        }
        if "choices" in spec.metadata:
            options["choices"] = spec.metadata["choices"]
        flag = "--" + spec.name.replace("_", "-")
        if spec.type in (bool, "bool"):
            _add_boolean(parser, flag, options)
            continue
        if "separator" in spec.metadata:
            parser.add_argument(flag, action=_Repeated, metavar="VALUE", **options)
            continue
        if spec.metadata.get("nargs"):
            options["nargs"] = spec.metadata["nargs"]
            options["type"] = int
        elif spec.type not in (str, "str"):
            options["type"] = lambda text, kind=spec.type: parse_value(kind, text)
        parser.add_argument(flag, **options)


def _add_boolean(parser: argparse.ArgumentParser, flag: str, options: dict[str, Any]) -> None:
    """``--flag`` (true), ``--flag=true|false`` (Triton's form) and ``--no-flag`` (false)."""
    parser.add_argument(
        flag, nargs="?", const=True, type=parse_bool, metavar="true|false", **options
    )
    parser.add_argument(
        "--no-" + flag[2:],
        dest=options["dest"],
        action="store_false",
        help=f"same as {flag}=false",
    )


class _Repeated(argparse.Action):
    """A repeatable flag whose first use replaces the default (or the environment's list)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        items = current if isinstance(current, list) else []
        items.append(values)
        setattr(namespace, self.dest, items)


def _shown(default: object) -> str:
    """A default as --help shows it (argparse would read a bare % as a format)."""
    if isinstance(default, bool):
        return "true" if default else "false"
    text = (" ".join(map(str, default)) or "none") if isinstance(default, tuple) else str(default)
    return text.replace("%", "%%")


def from_arguments(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags (see :func:`add_arguments`)."""
    values = {spec.name: getattr(args, spec.name) for spec in fields(Settings)}
    for spec in fields(Settings):
        if isinstance(values[spec.name], list):
            values[spec.name] = tuple(values[spec.name])
    return Settings(**values)
