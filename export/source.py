"""Load the PyTorch model named on the command line: an import path plus optional weights."""

from __future__ import annotations

import hashlib
import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError

__all__ = ["load_model", "sha256_of"]


def _resolve(source: str) -> object:
    module_name, sep, attribute = source.partition(":")
    if not sep or not module_name or not attribute:
        raise ExportError(
            f"model source '{source}' is not an import path: write package.module:callable, "
            "e.g. torchvision.models:resnet18"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExportError(f"cannot import module '{module_name}' ({exc})") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ExportError(f"module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    return target


def _instantiate(source: str) -> nn.Module:
    target = _resolve(source)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ExportError(f"'{source}' is neither an nn.Module nor a callable that builds one")
    try:
        model = target()
    except Exception as exc:
        raise ExportError(
            f"calling '{source}()' failed ({type(exc).__name__}: {exc}); export needs a "
            "callable that builds the model with no arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ExportError(f"'{source}()' returned {type(model).__name__}, not an nn.Module")
    return model


def _read_weights(path: Path) -> object:
    if not path.is_file():
        raise ExportError(f"weights file '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A whole saved module needs full unpickling; the user named this file explicitly.
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ExportError(f"cannot read weights file '{path}' ({exc})") from exc
    except Exception as exc:
        raise ExportError(
            f"cannot read weights file '{path}' ({type(exc).__name__}: {exc})"
        ) from exc


def _apply_state(model: nn.Module, state: dict[str, object], path: Path) -> None:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first_lines = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        raise ExportError(
            f"weights in '{path}' do not match {type(model).__name__}: {first_lines}"
        ) from exc


def load_model(source: str, weights: Path | None) -> nn.Module:
    """Build the model named by ``source`` and load ``weights`` into it, in eval mode.

    Args:
        source: ``package.module:callable`` (a class or factory called with no arguments) or
            ``package.module:instance``.
        weights: a state dict file, or a whole saved module (which then replaces the built one);
            None keeps the callable's own initialisation.

    Raises:
        ExportError: the import path, the file or the weights are wrong; the message says which.
    """
    model = _instantiate(source)
    if weights is not None:
        loaded = _read_weights(weights)
        if isinstance(loaded, nn.Module):
            model = loaded
        elif isinstance(loaded, dict):
            _apply_state(model, loaded, weights)
        else:
            raise ExportError(
                f"weights file '{weights}' holds a {type(loaded).__name__}, "
                "not a state dict or a module"
            )
    return model.eval()


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, for provenance."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
