"""Running a test's script in a Python process of its own.

For a script that must not share the test process: one that checks which modules a command
imports (a fresh ``sys.modules``), or one that runs an event loop of its own; and the
reliability scripts' ``--quick`` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_apart(script: str, *args: str, timeout: float = 180) -> Any:
    """Run ``script`` with ``args``; what it printed as JSON on its last line of output."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def run_quick(script: str) -> Any:
    """Run ``scripts/<script> --quick``: its report, once it says it found no failures."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failures"] == []
    return report
