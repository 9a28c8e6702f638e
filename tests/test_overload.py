"""``scripts/overload.py --quick``: under more requests in flight than the queue bound, every
answered call is accounted for, refusals are counted, the log stays clean, and the server
answers normally afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overload_quick_accounts_for_every_call_and_logs_no_error() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "overload.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failures"] == []
    assert {p["in_flight"] for p in report["phases"]} <= {256, 2048}
    for phase in report["phases"]:
        assert phase["accounted_share"] >= 0.99
        assert phase["server_codes"].get("OK", 0) > 0
    assert report["after_load"]["code"] == "OK"
    assert "ERROR" not in report["log_levels"]
