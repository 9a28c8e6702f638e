"""The import rule: lower layers never import higher ones, read from every module's imports.

The layers, lowest first: ``model_format`` (the repository file format, standard library only),
``service.core`` (errors, settings, shared types), ``service.engine``, ``service.classification``,
``service.wire``; ``service.tools`` sits beside them on the engine; ``service.app`` and the
command line (``service/__main__.py``) compose everything. ``export/`` shares only
``model_format`` with ``service/``. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "export", "model_format")

# What each room may import from the project (a prefix of a dotted module name).
ALLOWED: dict[str, tuple[str, ...]] = {
    "model_format": ("model_format",),
    "export": ("export", "model_format"),
    "service.core": ("service.core",),
    "service.engine": ("service.core", "service.engine", "model_format"),
    "service.classification": (
        "service.core",
        "service.engine",
        "service.classification",
        "model_format",
    ),
    "service.wire": (
        "service.core",
        "service.engine",
        "service.classification",
        "service.wire",
        "service._generated",
        "model_format",
    ),
    "service.tools": (
        "service.core",
        "service.engine",
        "service.tools",
        "service._generated",
        "model_format",
    ),
    "service.app": (
        "service.core",
        "service.engine",
        "service.classification",
        "service.wire",
        "service.app",
        "service._generated",
        "model_format",
    ),
}
# Third-party modules a room must not reach, even through an allowed room's file.
FORBIDDEN_OUTSIDE: dict[str, tuple[str, ...]] = {
    # only the runtime opens ONNX Runtime sessions in the server
    "onnxruntime": ("service.engine.runtime", "export"),
    "torch": ("export",),
    "torchvision": ("export",),
    # the HTTP server lives in the wire's REST package; the tools may use its client
    "aiohttp": ("service.wire.http", "service.tools"),
}
GRPC_FREE = ("model_format", "service.core.types", "service.engine", "service.classification")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_generated" not in path.parts:
                found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            # "from service.core import settings" imports the module service.core.settings
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def room_of(name: str) -> str | None:
    for room in sorted(ALLOWED, key=len, reverse=True):
        if name == room or name.startswith(room + "."):
            return room
    return None


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = project_modules()


def test_the_rule_sees_every_module() -> None:
    assert "service.engine.runtime" in MODULES and "model_format" in MODULES
    unplaced = [
        m for m in MODULES if room_of(m) is None and m not in ("service", "service.__main__")
    ]
    assert not unplaced, f"modules in no room: {unplaced}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name: str) -> None:
    room = room_of(name)
    if room is None:  # the package root and the command line compose everything
        return
    imported = imports_of(name, MODULES[name])
    # "from service.core import settings" names a module; "from service import X" a constant
    modules = {i if i in MODULES else i.rpartition(".")[0] for i in imported if is_project(i)}
    wrong = sorted(m for m in modules if m != "service" and not within(m, ALLOWED[room]))
    assert not wrong, f"{name} ({room}) imports {wrong}"
    for library, owners in FORBIDDEN_OUTSIDE.items():
        if not within(name, owners):
            assert not any(within(i, (library,)) for i in imported), f"{name} imports {library}"
    if within(name, GRPC_FREE):
        assert not any(within(i, ("grpc",)) for i in imported), f"{name} imports grpc"
    if room == "model_format":
        outside = {i.split(".")[0] for i in imported} - set(sys.stdlib_module_names)
        assert outside <= {"model_format", "__future__"}, f"{name} imports {outside}"


def test_the_codec_knows_no_runtime() -> None:
    imported = imports_of("service.wire.codec", MODULES["service.wire.codec"])
    assert not any(within(i, ("onnxruntime", "service.engine.runtime")) for i in imported)


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: a wrong-way import written into a module is reported."""
    fake = tmp_path / "batcher.py"
    fake.write_text("from service.wire.codec import decode_request\nimport onnxruntime\n")
    imported = imports_of("service.engine.batcher", fake)
    assert "service.wire.codec" in imported and "onnxruntime" in imported
    assert not within("service.wire.codec", ALLOWED["service.engine"])
