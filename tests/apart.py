"""Running a test's script in a Python process of its own.

For a script that must not share the test process: one that checks which modules a command
imports (a fresh ``sys.modules``), or one that runs an event loop of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


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
