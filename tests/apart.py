"""Running a test's script in a Python process of its own.

For what cannot share the test process: our KServe stubs and tritonclient's (the same proto
file), or a server's own event loop.
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
